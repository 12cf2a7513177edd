"""Tool-call parsers: each format's calls and content from a finished text, and the same
answer streamed: whatever the split into chunks, the deltas add up to the final message
(content, one id and name per call, argument fragments that concatenate to the
arguments), and text that only looks like the start of a call is never lost."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fusec.errors import InputError
from fusec.runtime.server.json_scan import object_members, value_end
from fusec.runtime.server.protocol import ChatCompletionRequest
from fusec.runtime.server.tool_calls import ToolCalling, required_calls_schema, tool_calling
from fusec.runtime.server.tool_parsers import (HermesToolParser, Llama3JsonToolParser, MistralToolParser,
                                               NamedCallParser, RequiredCallsParser)

WEATHER = '{"city": "Paris, \\"FR\\"", "days": [1, 2], "opts": {"unit": "C"}}'
TIME = '{"tz":"UTC+1"}'

# (parser, text, expected content, expected [(name, arguments)])
CASES = [
    (HermesToolParser, f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>',
     None, [("get_weather", WEATHER)]),
    (HermesToolParser, f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n'
                       f'</tool_call>\n<tool_call>\n{{"arguments": {TIME}, "name": "time"}}\n</tool_call>',
     "Let me check.", [("get_weather", WEATHER), ("time", TIME)]),
    (HermesToolParser, f'<tool_call>{{"name": "time", "arguments": {TIME}}}', None, [("time", TIME)]),  # no close tag
    (HermesToolParser, "Paris is in France. <tool>x</tool> <tool_ca", "Paris is in France. <tool>x</tool> <tool_ca",
     []),
    (HermesToolParser, '<tool_call>{"name": "time", "arguments": {"tz": ', None, [("time", '{"tz": ')]),  # cut off
    (HermesToolParser, '<tool_call>{"arguments": {"tz": 1}, "na', '<tool_call>{"arguments": {"tz": 1}, "na', []),
    (HermesToolParser, "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    (Llama3JsonToolParser, f'{{"name": "get_weather", "parameters": {WEATHER}}}', None, [("get_weather", WEATHER)]),
    (Llama3JsonToolParser, f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}; '
                           f'{{"name": "time", "parameters": {TIME}}}', None,
     [("get_weather", WEATHER), ("time", TIME)]),
    (Llama3JsonToolParser, "It is sunny {mostly}.", "It is sunny {mostly}.", []),
    (Llama3JsonToolParser, '{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    (MistralToolParser, f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {WEATHER}}}, '
                        f'{{"name": "time", "arguments": {TIME}}}]', None,
     [("get_weather", WEATHER), ("time", TIME)]),
    (MistralToolParser, f'Sure. [TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]time[ARGS]{TIME}', "Sure.",
     [("get_weather", WEATHER), ("time", TIME)]),
    (MistralToolParser, "No calls [TOOL here", "No calls [TOOL here", []),
    (RequiredCallsParser, f'[{{"name":"get_weather","parameters":{WEATHER}}},{{"name":"time","parameters":{TIME}}}]',
     None, [("get_weather", WEATHER), ("time", TIME)]),
    (RequiredCallsParser, '[{"name":"time","parameters":{"tz":"UT', None, [("time", '{"tz":"UT')]),  # length cut
    # malformed: a bare name, a raw control character, a bad escape in a key
    (HermesToolParser, '<tool_call>{"name": get, "arguments": {}}', '<tool_call>{"name": get, "arguments": {}}', []),
    (HermesToolParser, '<tool_call>{"name": "a\nb", "arguments": {}}', '<tool_call>{"name": "a\nb", "arguments": {}}',
     []),
    (HermesToolParser, '<tool_call>{"\\q": 1}', '<tool_call>{"\\q": 1}', []),
    # a malformed block after good calls ends the calls
    (HermesToolParser, f'<tool_call>{{"name":"time","arguments":{TIME}}}</tool_call>\n<tool_call>oops', None,
     [("time", TIME)]),
    (MistralToolParser, f'[TOOL_CALLS]time[ARGS]{TIME}\n[TOOL_CALLS]g[ARGS]}}', None, [("time", TIME), ("g", "")]),
    (HermesToolParser, '<tool_call>{"name": "g", "arguments": }', None, [("g", "")]),  # named, then broken
    (Llama3JsonToolParser, f'{{"name": "time", "parameters": {TIME}}}; {{x', None, [("time", TIME)]),
    # calls go out in order: an unnamed one ends them (here: none, so the text stays text)
    (HermesToolParser, f'<tool_call>{{"arguments": {{}}}}</tool_call><tool_call>{{"name":"time","arguments":{TIME}}}'
                       f'</tool_call>', f'<tool_call>{{"arguments": {{}}}}</tool_call><tool_call>{{"name":"time",'
                                        f'"arguments":{TIME}}}</tool_call>', []),
    # the first arguments key counts
    (HermesToolParser, '<tool_call>{"name":"f","arguments":{"a": 1},"arguments":{"b": 22}}', None, [("f", '{"a": 1}')]),
]


def _auto(parser_type) -> ToolCalling:
    return ToolCalling("auto", parser_type(), None, None)


@pytest.mark.parametrize("parser_type,text,content,calls", CASES)
def test_final_message(parser_type, text, content, calls):
    got_content, got_calls = _auto(parser_type).final(text)
    assert got_content == content
    assert [(c.function.name, c.function.arguments) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


def _split(text: str, rng: np.random.Generator) -> list[str]:
    cuts = sorted(set(rng.integers(0, len(text) + 1, size=rng.integers(1, 12)).tolist()) | {0, len(text)})
    return [text[:c] for c in cuts[1:]]


@pytest.mark.parametrize("parser_type,text,content,calls", CASES)
def test_streamed_deltas_add_up_to_the_final_message(parser_type, text, content, calls):
    rng = np.random.default_rng(len(text))
    splits = [[text[:k] for k in range(1, len(text) + 1)]] + [_split(text, rng) for _ in range(20)]
    for prefixes in splits:
        stream = _auto(parser_type).stream(0)
        streamed_content, names, ids, arguments = "", [], [], []
        for k, prefix in enumerate(prefixes):
            piece, deltas = stream.update(prefix, final=k == len(prefixes) - 1)
            streamed_content += piece
            for d in deltas:
                if d.id is not None:
                    assert d.index == len(names) and d.type == "function"
                    names.append(d.function.name)
                    ids.append(d.id)
                    arguments.append(d.function.arguments or "")
                else:
                    assert d.function.name is None and d.index < len(names)
                    arguments[d.index] += d.function.arguments
        assert streamed_content == (content or ""), prefixes
        assert list(zip(names, arguments)) == calls, prefixes
        assert stream.called == bool(calls)


def test_named_parser_streams_the_arguments_under_the_name():
    calling = ToolCalling("named", NamedCallParser("get_weather"), None, None)
    stream = calling.stream(0)
    _, first = stream.update("", final=False)
    assert first[0].function.name == "get_weather" and first[0].id
    _, more = stream.update(WEATHER, final=True)
    assert more[0].function.arguments == WEATHER
    content, calls = calling.final(WEATHER)
    assert content is None and calls[0].function.arguments == WEATHER


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = CASES[1][1]
    calling = ToolCalling("auto", HermesToolParser(), None, 1)
    assert [c.function.name for c in calling.final(text)[1]] == ["get_weather"]
    stream = calling.stream(0)
    _, deltas = stream.update(text, final=True)
    assert {d.index for d in deltas} == {0}


def test_json_scan_positions():
    text = '{"a": "x}\\"", "b": [1, {"c": 2}], "d": 3.5}'
    members, end = object_members(text, 0)
    assert end == len(text)
    assert [(m.key, text[m.start:m.end]) for m in members] == [("a", '"x}\\""'), ("b", '[1, {"c": 2}]'),
                                                               ("d", "3.5")]
    assert value_end('{"a": [1, 2', 0) is None and value_end("12", 0) is None and value_end("12,", 0) == 2


def _request(**fields) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "time"}}]
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                                                 **fields})


def test_tool_choice_policy():
    assert tool_calling(_request(tool_choice="none"), "hermes") is None
    assert tool_calling(_request(tool_choice=None), "hermes").mode == "auto"  # OpenAI's default with tools
    with pytest.raises(InputError, match="enable-auto-tool-choice"):
        tool_calling(_request(), None)
    required = tool_calling(_request(tool_choice="required"), None)
    assert required.mode == "required" and required.constraint is not None
    named = tool_calling(_request(tool_choice={"type": "function", "function": {"name": "get_weather"}}), None)
    assert named.mode == "named" and json.loads(named.constraint.json)["required"] == ["city"]
    with pytest.raises(InputError, match="not among"):
        tool_calling(_request(tool_choice={"type": "function", "function": {"name": "nope"}}), None)
    with pytest.raises(InputError, match="cannot be combined"):
        tool_calling(_request(tool_choice="required", response_format={"type": "json_object"}), None)
    with pytest.raises(InputError, match="needs tools"):
        tool_calling(_request(tools=None, tool_choice="required"), None)


def test_required_schema_lists_each_tool_and_caps_parallel_calls():
    req = _request()
    schema = required_calls_schema(req.tools, parallel=False)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["time"]]


def test_required_schema_hoists_defs_so_references_resolve():
    tools = [{"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}}}}}]
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                                                "tool_choice": "required"})
    schema = required_calls_schema(req.tools, parallel=True)
    assert schema["$defs"] == {"Place": tools[0]["function"]["parameters"]["$defs"]["Place"]}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    clash = dict(tools[0], function=dict(tools[0]["function"], name="other", parameters={
        "type": "object", "$defs": {"Place": {"type": "string"}}}))
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                "tools": tools + [clash], "tool_choice": "required"})
    with pytest.raises(InputError, match="Place"):
        required_calls_schema(req.tools, parallel=True)


def test_mangled_outputs_stream_as_they_finish():
    """1000 model outputs mangled from the cases (characters and markers inserted or
    deleted, cut short): no exception escapes, and the stream in random splits always
    adds up to the final message."""
    rng = np.random.default_rng(0)
    pieces = list('{}[]",:<>/ a\\\n') + ["<tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", '"name"',
                                          '"arguments"']
    for _ in range(1000):
        parser_type, text, _, _ = CASES[rng.integers(len(CASES))]
        for _ in range(rng.integers(1, 4)):
            k = int(rng.integers(0, len(text) + 1))
            op = rng.integers(3)
            text = (text[:k] + pieces[rng.integers(len(pieces))] + text[k:] if op == 0 else
                    text[:k] + text[k + 1:] if op == 1 else text[:k])
        if not text:
            continue
        content, calls = _auto(parser_type).final(text)
        cuts = sorted({int(c) for c in rng.integers(1, len(text) + 1, size=rng.integers(1, 10))} | {len(text)})
        stream = _auto(parser_type).stream(0)
        streamed, names, arguments = "", [], []
        for cut in cuts:
            piece, deltas = stream.update(text[:cut], final=cut == len(text))
            streamed += piece
            for d in deltas:
                if d.id is not None:
                    names.append(d.function.name)
                    arguments.append(d.function.arguments or "")
                else:
                    arguments[d.index] += d.function.arguments
        assert streamed == (content or ""), text
        assert list(zip(names, arguments)) == [(c.function.name, c.function.arguments) for c in calls], text
