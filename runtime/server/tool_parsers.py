"""Tool calls read out of a model's text: the formats models are trained to write (vLLM's
`--tool-call-parser` names: hermes, llama3_json, mistral) and the JSON that the grammar
for `tool_choice` "required" or a named function forces. A parser reads the whole text
so far and returns the content and the calls it has found; streaming and the final
answer come from that one reading, so a streamed call's fragments add up to the final
call. Arguments are the model's own JSON text (a prefix of it while it streams)."""
from __future__ import annotations

import json
import secrets
import string
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from fusec.runtime.server.json_scan import JSONScanError, object_members, skip_ws, value_end


@dataclass
class PartialCall:
    name: str | None  # None until the name is complete
    arguments: str  # the arguments' JSON text as far as it goes (cut off when the output was)


@dataclass
class ParsedOutput:
    content: str  # the text meant for the user; while streaming, what is surely not a call
    calls: list[PartialCall]


class ToolParser(ABC):
    @abstractmethod
    def parse(self, text: str, final: bool) -> ParsedOutput:
        """Content and calls in `text`; `final` when the text is complete. JSONScanError
        when the text cannot be calls."""

    def call_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _call_in_object(text: str, start: int, argument_keys: tuple[str, ...]) -> tuple[PartialCall, int | None]:
    """The call written as an object {"name": ..., <argument key>: {...}} at text[start];
    the index past the object, or None while it is open. A fault after the name ends the
    call where it is (its name may have been streamed already)."""
    try:
        members, end = object_members(text, start)
    except JSONScanError as e:
        if not any(m.key == "name" and m.end is not None for m in e.members):
            raise
        members, end = e.members, None
    name, arguments = None, ""
    for m in members:
        if m.key == "name" and m.end is not None:
            name = json.loads(text[m.start:m.end])
            if not isinstance(name, str):
                raise JSONScanError("a tool call's name must be a string")
        elif m.key in argument_keys and not arguments:
            arguments = text[m.start:len(text) if m.end is None else m.end]
    return PartialCall(name, arguments), end


def _calls_in_array(text: str, start: int, argument_keys: tuple[str, ...]) -> list[PartialCall]:
    """Calls written as a JSON array of call objects opening at text[start] ('[')."""
    calls: list[PartialCall] = []
    i = skip_ws(text, start + 1)
    while i < len(text) and text[i] != "]":
        if text[i] == "," and calls:
            i = skip_ws(text, i + 1)
            continue
        found = _next_call(calls, lambda: _call_in_object(text, i, argument_keys))
        if found is None:
            break
        i = skip_ws(text, found)
    return calls


def _next_call(calls: list[PartialCall], read) -> int | None:
    """Append the call `read()` returns and give the index past it; None when it is
    still open, or malformed after good calls (the calls end there; malformed first,
    the text is not calls: JSONScanError)."""
    try:
        call, end = read()
    except ValueError:
        if not calls:
            raise
        return None
    calls.append(call)
    return end


def _prose(text: str, marker: str, final: bool) -> str:
    """Text with no call marker yet, as content: while streaming, hold back an ending that
    may be the start of the marker, and trailing whitespace (it is dropped before a call)."""
    if final:
        return text
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            text = text[:-k]
            break
    return text.rstrip()


class HermesToolParser(ToolParser):
    """Hermes / Qwen2.5 / SmolLM2: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
    one block per call, after optional prose."""
    start = "<tool_call>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.start)
        if first < 0:
            return ParsedOutput(_prose(text, self.start, final), [])
        calls: list[PartialCall] = []
        at = first
        while at >= 0:
            i = skip_ws(text, at + len(self.start))
            if i >= len(text):
                break
            end = _next_call(calls, lambda: _call_in_object(text, i, ("arguments", "parameters")))
            if end is None:
                break
            at = text.find(self.start, end)
        return ParsedOutput(text[:first].rstrip(), calls)


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1-3.3 JSON tool calling: the answer is `{"name": ..., "parameters": {...}}`
    (optionally after <|python_tag|>, several separated by ';'), or prose."""
    tag = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        i = skip_ws(text, 0)
        if text.startswith(self.tag, i):
            i = skip_ws(text, i + len(self.tag))
        elif not final and self.tag.startswith(text[i:]):
            return ParsedOutput("", [])  # nothing yet, or the start of the tag
        if i >= len(text):
            return ParsedOutput(text if final else "", [])
        if text[i] != "{":
            return ParsedOutput(text if final else text.rstrip(), [])
        calls: list[PartialCall] = []
        while i < len(text) and text[i] == "{":
            end = _next_call(calls, lambda: _call_in_object(text, i, ("parameters", "arguments")))
            if end is None:
                break
            i = skip_ws(text, end)
            if i < len(text) and text[i] in ";,":
                i = skip_ws(text, i + 1)
        return ParsedOutput("", calls)


class MistralToolParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers) or
    `[TOOL_CALLS]name[ARGS]{...}` per call (v11 and later), after optional prose. Call ids
    are 9 letters and digits, which Mistral's chat templates require."""
    marker, args_marker = "[TOOL_CALLS]", "[ARGS]"
    _id_chars = string.ascii_letters + string.digits

    def call_id(self) -> str:
        return "".join(secrets.choice(self._id_chars) for _ in range(9))

    @staticmethod
    def _v11_call(text: str, start: int, sep: int, j: int) -> tuple[PartialCall, int | None]:
        name = text[start:sep].strip()
        try:
            end = value_end(text, j) if j < len(text) else None
        except JSONScanError:  # no arguments after the name: the call ends (its name may have gone out)
            return PartialCall(name, ""), None
        return PartialCall(name, text[j:len(text) if end is None else end]), end

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.marker)
        if first < 0:
            return ParsedOutput(_prose(text, self.marker, final), [])
        content = text[:first].rstrip()
        i = skip_ws(text, first + len(self.marker))
        if i < len(text) and text[i] == "[":
            return ParsedOutput(content, _calls_in_array(text, i, ("arguments", "parameters")))
        calls: list[PartialCall] = []
        at = first
        while at >= 0:
            start = at + len(self.marker)
            sep = text.find(self.args_marker, start)
            if sep < 0:
                break  # the name is still coming
            j = skip_ws(text, sep + len(self.args_marker))
            end = _next_call(calls, lambda: self._v11_call(text, start, sep, j))
            if end is None:
                break
            at = text.find(self.marker, end)
        return ParsedOutput(content, calls)


class RequiredCallsParser(ToolParser):
    """tool_choice "required": the grammar forces `[{"name": ..., "parameters": {...}}, ...]`."""

    def parse(self, text: str, final: bool) -> ParsedOutput:
        i = skip_ws(text, 0)
        if i >= len(text):
            return ParsedOutput("", [])
        if text[i] != "[":
            raise JSONScanError("expected a JSON array of tool calls")
        return ParsedOutput("", _calls_in_array(text, i, ("parameters",)))


class NamedCallParser(ToolParser):
    """tool_choice naming a function: the grammar forces the arguments object alone."""

    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput("", [PartialCall(self.name, text.strip())])


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}
