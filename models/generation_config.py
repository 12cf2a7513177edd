"""Default sampling parameters from a model's generation_config.json (vLLM's
`--generation-config auto`): what a request that leaves a field unset gets."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fusec.errors import InputError, ModelLoadError

log = logging.getLogger(__name__)

# generation_config.json field -> the sampling parameter it sets (the fields vLLM reads)
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# transformers' GenerationConfig defaults: vLLM reads only the fields that differ from them
HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def default_sampling(source: str, model_path: Path, override: str | None = None) -> dict[str, Any]:
    """source: "auto" (the model directory's file, if any), "vllm" (none), or a
    directory holding a generation_config.json; override: JSON merged over it
    (--override-generation-config). max_tokens, when set, caps every request's (vLLM's rule)."""
    raw = _source(source, model_path)
    # a model's own out-of-range value is skipped (with a word), not made every request's error
    defaults = {param: raw[key] for key, param in FIELDS.items()
                if _number(raw.get(key)) and raw[key] != HF_DEFAULTS.get(key) and _usable(key, raw[key])}
    for key, value in _override(override).items():
        defaults[FIELDS[key]] = value
    if defaults:
        log.info("default sampling parameters from the model's generation config (--generation-config vllm to "
                 "ignore them): %s", defaults)
    return defaults


def check_generation_config(source: str, override: str | None) -> None:
    """What the flags name, checked before the model loads: the folder holds a
    generation_config.json, the override is valid."""
    if source not in ("auto", "vllm"):
        _folder(source)
    _override(override)


# what each sampling default must be for a request to accept it
VALID = {"temperature": lambda v: v >= 0, "top_p": lambda v: 0 < v <= 1,
         "top_k": lambda v: isinstance(v, int) and v >= -1, "min_p": lambda v: 0 <= v <= 1,
         "repetition_penalty": lambda v: v > 0, "max_new_tokens": lambda v: isinstance(v, int) and v >= 1}


def _override(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InputError(f"--override-generation-config is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise InputError("--override-generation-config must be a JSON object")
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise InputError(f"--override-generation-config: unknown keys {unknown}; expected some of {sorted(FIELDS)}")
    bad = sorted(k for k, v in value.items() if not _number(v) or not VALID[k](v))
    if bad:
        raise InputError(f"--override-generation-config: out-of-range values for {bad}")
    return value


def _folder(source: str) -> Path:
    folder = Path(source).expanduser()
    if not (folder / "generation_config.json").is_file():
        raise InputError(f"--generation-config {source}: no generation_config.json there")
    return folder


def _source(source: str, model_path: Path) -> dict[str, Any]:
    if source == "vllm":
        return {}
    if source == "auto":
        return _read(model_path) if model_path.is_dir() else {}  # a GGUF carries no generation config
    return _read(_folder(source))


def eos_token_ids(model_path: Path) -> set[int]:
    """The end-of-sequence ids a model's generation_config.json adds (Llama 3's
    instruct models end turns with <|eot_id|>, listed only there). vLLM stops on them
    whatever --generation-config says."""
    try:
        value = _read(model_path).get("eos_token_id") if model_path.is_dir() else None
    except ModelLoadError as e:  # the file is optional: a broken one costs its stop ids, not the model
        log.warning("%s", e)
        return set()
    ids = value if isinstance(value, list) else [value]
    return {i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0}


def _usable(key: str, value: Any) -> bool:
    if VALID[key](value):
        return True
    log.warning("generation_config.json: %s = %r is out of range; not used as a default", key, value)
    return False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return raw
