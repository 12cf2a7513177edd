"""Corrupt and hostile model files: every one refused before any large allocation, with
one line naming what is wrong (exit 2 from the CLI), in well under a second of loading."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from fusec.errors import ModelLoadError
from fusec.models.loader import load_model

FUSEC = str(Path(sys.executable).with_name("fusec"))


def _read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _tensor_names(header: dict) -> list[str]:
    return sorted(name for name in header if name != "__metadata__")


def _config(key: str, value: object) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        path = model / "config.json"
        cfg = json.loads(path.read_text())
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
        path.write_text(json.dumps(cfg))
    return edit


def _header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        header, data = _read_safetensors(model / "model.safetensors")
        change(header)
        _write_safetensors(model / "model.safetensors", header, data)
    return edit


def _set(name: str, **info: object) -> Callable[[dict], None]:
    return lambda header: header[name].update(info)


def _all_at_offset_0(header: dict) -> None:
    for name in _tensor_names(header):
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [0, end - start]


def _nan_in_data(model: Path) -> None:
    header, data = _read_safetensors(model / "model.safetensors")
    start, end = header[Q]["data_offsets"]
    values = np.frombuffer(data[start:end], np.float32).copy()
    values[np.random.default_rng(3).integers(values.size)] = np.nan
    _write_safetensors(model / "model.safetensors", header, data[:start] + values.tobytes() + data[end:])


def _swap_offsets(header: dict) -> None:  # q's bytes read as k's, which are fewer
    header[Q]["data_offsets"], header[K]["data_offsets"] = header[K]["data_offsets"], header[Q]["data_offsets"]


Q, K = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
# tiny llama: vocab 301, hidden 72, 6 heads of 16, 2 kv heads, 2 layers (tests/conftest.py)
HF_CASES: dict[str, tuple[Callable[[Path], None], list[str], str]] = {
    "a billion layers": (_config("num_hidden_layers", 10**9), [], "num_layers must be an integer in 1..1024"),
    "float hidden size": (_config("hidden_size", 64.5), [], "hidden_size must be an integer, got 64.5"),
    "integral float": (_config("intermediate_size", 136.0), [], "intermediate_size must be an integer"),
    "bool heads": (_config("num_key_value_heads", True), [], "num_key_value_heads must be an integer"),
    "string vocab": (_config("vocab_size", "301"), [], "vocab_size must be an integer"),
    "heads not dividing hidden": (
        lambda m: (_config("head_dim", None)(m), _config("num_attention_heads", 7)(m)), [],
        "hidden size 72 is not a multiple of 7 attention heads"),
    "10^12 vocab": (_config("vocab_size", 10**12), ["--load-format", "dummy"], "vocab_size must be an integer in"),
    "dummy weights past memory": (
        lambda m: (_config("vocab_size", 1 << 24)(m), _config("hidden_size", 1 << 16)(m)),
        ["--load-format", "dummy"], "--load-format dummy: the config's weights need"),
    "negative shape": (_header(_set(Q, shape=[-8, -8])), [], "bad shape [-8, -8]"),
    "huge empty shape": (_header(_set(Q, shape=[2**62, 0], data_offsets=[0, 0])), [],
                         f"tensor '{Q}' has shape [{2**62}, 0], the config implies [96, 72]"),
    "all tensors at offset 0": (_header(_all_at_offset_0), [], "overlaps tensor"),
    "offsets past the file": (_header(_set(Q, data_offsets=[10**9, 10**9 + 96 * 72 * 4])), [],
                              "do not hold its 27648 bytes"),
    "length not shape x dtype": (_header(_swap_offsets), [], "do not hold its 9216 bytes"),
    "transposed tensor": (_header(_set(Q, shape=[72, 96])), [],
                          f"tensor '{Q}' has shape [72, 96], the config implies [96, 72]"),
    "missing tensor": (_header(lambda h: h.pop(K)), [], f"checkpoint lacks tensor '{K}'"),
    "NaN weight": (_nan_in_data, [], f"tensor '{Q}' holds NaN or infinite values"),
}


def _gguf_random_middle(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid:mid + (1 << 20)] = np.random.default_rng(5).bytes(1 << 20)
    dst.write_bytes(bytes(data))


def _gguf_overlap(src: Path, dst: Path) -> None:
    """Point the second tensor's data at the first one's."""
    import gguf

    tensors = gguf.GGUFReader(str(src)).tensors
    first, second = sorted(tensors, key=lambda t: t.data_offset)[:2]
    field = second.field
    at = field.offset + sum(p.nbytes for p in field.parts[:-1])  # its offset, the info's last part
    data = bytearray(src.read_bytes())
    data[at:at + 8] = struct.pack("<Q", int(first.field.parts[-1][0]))
    dst.write_bytes(bytes(data))


GGUF_CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "1 MiB of random bytes in the middle": (_gguf_random_middle, "holds NaN or infinite values"),
    "overlapping tensor data": (_gguf_overlap, "overlaps tensor"),
}


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_checkpoints, smollm2_path) -> dict[str, tuple[Path, list[str], str]]:
    root = tmp_path_factory.mktemp("hardening")
    out = {}
    for i, (case, (edit, flags, expected)) in enumerate(HF_CASES.items()):
        model = root / f"hf{i}"
        shutil.copytree(tiny_checkpoints["llama"], model)
        edit(model)
        out[case] = (model, flags, expected)
    for i, (case, (corrupt, expected)) in enumerate(GGUF_CASES.items()):
        model = root / f"model{i}.gguf"
        corrupt(smollm2_path, model)
        out[case] = (model, [], expected)
    return out


CASES = [*HF_CASES, *GGUF_CASES]


@pytest.mark.parametrize("case", CASES)
def test_load_refuses_with_one_line_quickly(bad_models, case):
    model, flags, expected = bad_models[case]
    load_format = flags[1] if flags else "auto"
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model(str(model), load_format=load_format)
    # parsing an intact GGUF's header (its 49k-token vocabulary) alone takes about a second
    assert time.perf_counter() - start < (5.0 if case in GGUF_CASES else 1.0)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", CASES)
def test_cli_exits_2_with_one_line(bad_models, case):
    model, flags, expected = bad_models[case]
    res = subprocess.run([FUSEC, "generate", "--model", str(model), *flags, "--prompt", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_the_intact_files_still_load(tiny_checkpoints, smollm2_path):
    """The checks refuse only what is wrong: the untouched checkpoints load."""
    assert load_model(str(tiny_checkpoints["llama"])).config.num_layers == 2
    assert load_model(str(smollm2_path)).config.num_layers == 30
