"""What a chat request's `tools` and `tool_choice` ask of its output, vLLM's way:
- "none" (or no tools): plain text;
- "auto": the model answers freely and the server's `--tool-call-parser` reads calls out
  of its text (only with `--enable-auto-tool-choice`);
- "required" or a named function: a grammar built from the tools' JSON schemas forces a
  valid call, whatever the parser; finish_reason "tool_calls" for "required", "stop" for a
  named function, as OpenAI answers.
ToolCallStream turns successive readings of a choice's text into OpenAI's stream deltas."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from fusec.errors import InputError
from fusec.runtime.server.protocol import (ChatCompletionRequest, ChatTool, DeltaFunctionCall, DeltaToolCall,
                                           FunctionCall, ToolCall)
from fusec.runtime.server.tool_parsers import (TOOL_PARSERS, NamedCallParser, ParsedOutput, PartialCall,
                                               RequiredCallsParser, ToolParser)
from fusec.runtime.structured_output import StructuredOutputsParams

log = logging.getLogger("fusec.server")


def required_calls_schema(tools: list[ChatTool], parallel: bool) -> dict[str, Any]:
    """The JSON the grammar forces for tool_choice "required": a list of calls, each one
    of the tools by name with arguments that match its parameters. Each tool's `$defs`
    move to the root, where its `#/$defs/...` references point."""
    calls, defs = [], {}
    for t in tools:
        params = dict(t.function.parameters or {"type": "object"})
        for key in ("$defs", "definitions"):  # draft 2019+ and its predecessors
            for name, definition in params.pop(key, {}).items():
                if defs.setdefault(key, {}).setdefault(name, definition) != definition:
                    raise InputError(f"tools define {key}/{name} differently: tool_choice \"required\" needs "
                                     f"one meaning")
        calls.append({"type": "object",
                      "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": params},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    schema.update(defs)
    return schema


@dataclass
class ToolCalling:
    """One chat request's tool-call handling: its parser, the constraint it puts on the
    output (required / named) and one stream per choice."""
    mode: Literal["auto", "required", "named"]
    parser: ToolParser
    constraint: StructuredOutputsParams | None
    max_calls: int | None  # 1 when parallel_tool_calls is false
    streams: dict[int, ToolCallStream] = field(default_factory=dict)

    def stream(self, choice: int) -> ToolCallStream:
        if choice not in self.streams:
            self.streams[choice] = ToolCallStream(self.parser, self.max_calls)
        return self.streams[choice]

    def final(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished choice's content and calls. Text that holds no named call stays
        content; a call cut off by max_tokens is returned as far as it goes (finish_reason
        "length"), as OpenAI does."""
        parsed = _parse(self.parser, text, final=True)
        named = [] if parsed is None else leading_calls(parsed.calls, self.max_calls)
        if not named:
            return text, []
        calls = [ToolCall(id=self.parser.call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in named]
        return parsed.content or None, calls

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        if engine_reason == "stop" and called and self.mode != "named":
            return "tool_calls"
        return engine_reason


def leading_calls(calls: list[PartialCall], max_calls: int | None) -> list[PartialCall]:
    """The calls that go out: in order, up to the first whose name is not complete, at
    most max_calls."""
    named = []
    for call in calls[:max_calls]:
        if call.name is None:
            break
        named.append(call)
    return named


def _parse(parser: ToolParser, text: str, final: bool) -> ParsedOutput | None:
    try:
        return parser.parse(text, final)
    except ValueError as e:  # JSONScanError, or json's own error on a malformed name or key
        log.warning("model output is not a well-formed tool call (%s): answering with text", e)
        return None


class ToolCallStream:
    """One choice's stream: each update reads the whole text so far and returns what is
    new, content and tool-call deltas (a call's id, type and name once, then argument
    fragments). Calls go out in order; a call's arguments wait for its name."""

    def __init__(self, parser: ToolParser, max_calls: int | None) -> None:
        self.parser, self.max_calls = parser, max_calls
        self.content_sent = 0
        self.arguments_sent: list[int] = []  # per call that went out
        self.broken = False

    @property
    def called(self) -> bool:
        return bool(self.arguments_sent)

    def update(self, text: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        parsed = None if self.broken else _parse(self.parser, text, final)
        calls = [] if parsed is None else leading_calls(parsed.calls, self.max_calls)
        if parsed is None or (final and not self.called and not calls):
            # not calls after all: the text goes out as it is, unless a call already went
            self.broken = True
            rest = "" if self.called else text[self.content_sent:]
            self.content_sent = len(text)
            return rest, []
        content = parsed.content[self.content_sent:]
        self.content_sent = len(parsed.content)
        return content, self._call_deltas(calls)

    def _call_deltas(self, calls: list[PartialCall]) -> list[DeltaToolCall]:
        deltas: list[DeltaToolCall] = []
        for index, call in enumerate(calls):
            if index == len(self.arguments_sent):
                self.arguments_sent.append(len(call.arguments))
                deltas.append(DeltaToolCall(index=index, id=self.parser.call_id(), type="function",
                                            function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
                continue
            new = call.arguments[self.arguments_sent[index]:]
            if new:
                self.arguments_sent[index] = len(call.arguments)
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=new)))
        return deltas


def tool_calling(req: ChatCompletionRequest, auto_parser: str | None) -> ToolCalling | None:
    """How the request's output becomes tool calls, or None for plain text; InputError for
    a tool_choice the request or the server cannot honour (vLLM's messages)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise InputError("tool_choice needs tools")
        return None
    if choice is None:
        choice = "auto"  # OpenAI's default when tools are given
    if choice == "none":
        return None
    max_calls = None if req.parallel_tool_calls else 1
    if choice == "auto":
        if auto_parser is None:
            raise InputError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        return ToolCalling("auto", TOOL_PARSERS[auto_parser](), None, max_calls)
    if req.structured_outputs_params() is not None:
        raise InputError("tool_choice \"required\" or a named function forces the output's form: it cannot be "
                         "combined with response_format or structured outputs")
    if choice == "required":
        schema = required_calls_schema(req.tools, req.parallel_tool_calls)
        return ToolCalling("required", RequiredCallsParser(), StructuredOutputsParams.build(json=schema), max_calls)
    name = choice.function.name
    tool = next((t for t in req.tools if t.function.name == name), None)
    if tool is None:
        raise InputError(f"tool_choice names the function {name!r}, which is not among the request's tools")
    schema = tool.function.parameters or {"type": "object"}
    return ToolCalling("named", NamedCallParser(name), StructuredOutputsParams.build(json=schema), max_calls)
