"""Tool calling through `fusec serve --enable-auto-tool-choice --tool-call-parser hermes`
on the default model, with the official openai client and LangChain: tool_choice
"required" and a named function always give valid calls whose arguments match the
function's schema (sampled at temperature 1), "auto" reads the model's <tool_call> blocks,
streamed calls add up to the non-streamed ones, and tool turns go back to the model."""
from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from server_helpers import serve_for_module

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "pattern": "^UTC[+-][0-9]{1,2}$"}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# under tool_choice "auto" the model writes a hermes block; this regex makes it do so
HERMES_CALL = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Lyon)", "unit": "celsius"\}\}' \
              r'\n</tool_call>'


@pytest.fixture(scope="module")
def server():
    yield from serve_for_module("--served-model-name", "smol", "--max-model-len", "2048",
                                "--enable-auto-tool-choice", "--tool-call-parser", "hermes")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_named_function_always_gets_a_valid_call(client):
    out = client.chat.completions.create(
        model="smol", messages=ASK, tools=TOOLS, n=20, temperature=1.0, seed=5, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in out.choices:
        assert choice.finish_reason == "stop" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_required_always_gets_valid_calls(client):
    out = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="required", n=20,
                                         temperature=1.0, seed=9, max_tokens=200)
    names = set()
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            names.add(call.function.name)
    assert names  # every call named one of the tools
    single = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="required", n=8,
                                            temperature=1.0, seed=9, max_tokens=200, parallel_tool_calls=False)
    assert all(len(c.message.tool_calls) == 1 for c in single.choices)


def test_required_with_nested_definitions(client):
    """A tool whose parameters reference their own $defs (pydantic's nested models)."""
    place = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
             "additionalProperties": False}
    params = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
              "additionalProperties": False, "$defs": {"Place": place}}
    tool = {"type": "function", "function": {"name": "book", "parameters": params}}
    out = client.chat.completions.create(model="smol", messages=ASK, tools=[tool], tool_choice="required", n=4,
                                         temperature=1.0, seed=2, max_tokens=200)
    for choice in out.choices:
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), params)


def _streamed(client, **kwargs) -> list[dict]:
    """Each choice of a streamed answer put back together: content, calls, finish_reason."""
    choices: dict[int, dict] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"content": "", "calls": {}, "finish_reason": None})
            got["content"] += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    assert d.index not in got["calls"] and d.function.name
                    got["calls"][d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                got["calls"][d.index]["arguments"] += d.function.arguments or ""
            got["finish_reason"] = c.finish_reason or got["finish_reason"]
    return [choices[k] for k in sorted(choices)]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_calls_equal_the_answer(client, tool_choice):
    kwargs = dict(model="smol", messages=ASK, tools=TOOLS, tool_choice=tool_choice, n=3, temperature=1.0, seed=11,
                  max_tokens=200)
    whole = client.chat.completions.create(**kwargs)
    for choice, streamed in zip(whole.choices, _streamed(client, **kwargs), strict=True):
        assert streamed["finish_reason"] == choice.finish_reason
        assert streamed["content"] == (choice.message.content or "")
        calls = [streamed["calls"][k] for k in sorted(streamed["calls"])]
        assert [(c["name"], c["arguments"]) for c in calls] == \
               [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_auto_reads_hermes_calls_from_the_text(client):
    kwargs = dict(model="smol", messages=ASK, tools=TOOLS, tool_choice="auto", temperature=1.0, seed=1, n=4,
                  max_tokens=80, extra_body={"structured_outputs": {"regex": HERMES_CALL}})
    out = client.chat.completions.create(**kwargs)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Lyon")
    for choice, streamed in zip(out.choices, _streamed(client, **kwargs), strict=True):
        assert streamed["finish_reason"] == "tool_calls" and streamed["content"] == ""
        assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == \
               [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_auto_without_a_call_is_text(client):
    """Prose under auto, ended by the end-of-turn token, which stays out of the text
    although auto keeps special tokens."""
    out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hello."}],
                                         tools=TOOLS, temperature=0, max_tokens=100)
    choice = out.choices[0]
    assert choice.message.content and choice.message.tool_calls == [] and choice.finish_reason == "stop"
    assert "<|im_end|>" not in choice.message.content
    streamed = _streamed(client, model="smol", messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS,
                         temperature=0, max_tokens=100)
    assert streamed[0]["content"] == choice.message.content and not streamed[0]["calls"]


def test_tools_with_tool_choice_none_render_and_answer_in_text(client):
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = client.chat.completions.create(model="smol", messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=5,
                                         temperature=0)
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls


@pytest.mark.parametrize("extra, message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "nope"),
])
def test_bad_tool_requests_are_400s(client, extra, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smol", messages=ASK, max_tokens=5, extra_body=extra)
    assert message in err.value.response.json()["error"]["message"]


# -- LangChain ---------------------------------------------------------------------------------


class City(pydantic.BaseModel):
    """A city and its country."""
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population: int = pydantic.Field(ge=0, le=10**8)


class GetWeather(pydantic.BaseModel):
    """The weather in a city."""
    city: str = pydantic.Field(max_length=20)  # bounded: a 135M model at temperature 0 may never close a string
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module")
def chat(server):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model="smol", base_url=server.url + "/v1", api_key="none", temperature=0, max_tokens=120,
                      max_retries=0)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat, method):
    city = chat.with_structured_output(City, method=method).invoke("Name a city in France.")
    assert isinstance(city, City) and city.name


def test_langchain_json_mode(chat):
    got = chat.with_structured_output(None, method="json_mode").invoke("Describe Paris as a JSON object.")
    assert isinstance(got, dict)


def test_langchain_tool_conversation(chat):
    from langchain_core.messages import HumanMessage, ToolMessage

    forced = chat.bind_tools([GetWeather], tool_choice="GetWeather")
    question = HumanMessage("What is the weather in Paris?")
    ai = forced.invoke([question])
    (call,) = ai.tool_calls
    assert call["name"] == "GetWeather" and call["id"]
    GetWeather.model_validate(call["args"])
    anyone = chat.bind_tools([GetWeather], tool_choice="any").invoke([question])
    assert anyone.tool_calls and anyone.tool_calls[0]["name"] == "GetWeather"
    # the call and its result go back to the model, which answers (tools still bound, "auto")
    result = ToolMessage(f"sunny in {call['args']['city']}", tool_call_id=call["id"])
    answer = chat.bind_tools([GetWeather]).invoke([question, ai, result])
    assert isinstance(answer.content, str) and (answer.content or answer.tool_calls)
