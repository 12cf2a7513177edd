"""Chat templates (HF's Jinja dialect) rendered with jinja2 in a sandbox."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fusec.errors import InputError


def _raise(message: str) -> None:
    raise InputError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_chat_template(value: str) -> str:
    """--chat-template: a file's contents, or the value itself when it is a template
    (vLLM's rule: a value with Jinja markup that names no file is the template)."""
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a template string too long to be a file name
        pass
    if any(mark in value for mark in ("{{", "{%")):
        return value
    raise InputError(f"The supplied chat template ({value}) looks like a file path, but it failed to be opened")


def render_chat(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **extra)
    except InputError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
        # what the conversation or chat_template_kwargs made the template do: the request's fault
        raise InputError(f"chat template failed: {e}") from None
