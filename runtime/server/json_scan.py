"""Scanning JSON text that may be cut off mid-value (a model's output while it streams):
where a value ends and which members an object has so far, as positions in the original
text, so what is streamed of a value is always an exact prefix of its final text."""
from __future__ import annotations

import json
from dataclasses import dataclass

WHITESPACE = " \t\n\r"
_SCALAR_END = ",}]" + WHITESPACE


class JSONScanError(ValueError):
    """The text is not JSON where JSON was expected; `members` are an object's members
    read before the fault."""

    def __init__(self, message: str, members: list[Member] | None = None) -> None:
        super().__init__(message)
        self.members = members or []


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def string_end(text: str, start: int) -> int | None:
    """Index past the string literal opening at text[start]; None if the text ends first."""
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def value_end(text: str, start: int) -> int | None:
    """Index past the JSON value beginning at text[start]; None if the text ends first.
    Scalars end at a delimiter: one at the very end of the text may still grow."""
    c = text[start]
    if c == '"':
        return string_end(text, start)
    if c in "{[":
        depth, i = 0, start
        while i < len(text):
            c = text[i]
            if c == '"':
                end = string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    if c in "}],:":
        raise JSONScanError(f"expected a JSON value at {c!r}")
    i = start
    while i < len(text) and text[i] not in _SCALAR_END:
        i += 1
    return i if i < len(text) else None


@dataclass
class Member:
    """One key of an object and where its value lies in the text."""
    key: str
    start: int
    end: int | None  # None: the value is cut off


def object_members(text: str, start: int) -> tuple[list[Member], int | None]:
    """The members of the object opening at text[start] ('{') as far as the text goes, and
    the index past its '}' (None while it is open)."""
    if text[start] != "{":
        raise JSONScanError("expected a JSON object")
    members: list[Member] = []
    try:
        return _read_members(text, start + 1, members)
    except ValueError as e:  # JSONScanError, or json's own on a malformed key
        raise JSONScanError(str(e), members) from None


def _read_members(text: str, i: int, members: list[Member]) -> tuple[list[Member], int | None]:
    while True:
        i = skip_ws(text, i)
        if i >= len(text):
            return members, None
        c = text[i]
        if c == "}":
            return members, i + 1
        if c == "," and members:
            i += 1
            continue
        if c != '"':
            raise JSONScanError(f"expected a key, found {c!r}")
        key_end = string_end(text, i)
        if key_end is None:
            return members, None
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text):
            return members, None
        if text[i] != ":":
            raise JSONScanError(f"expected ':' after {key!r}")
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return members, None
        end = value_end(text, i)
        members.append(Member(key, i, end))
        if end is None:
            return members, None
        i = end
