"""The `fusec` console script: real runs, and bad input answered with one line and exit 2."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusec.models.config import HF_ARCHITECTURES

FUSEC = str(Path(sys.executable).with_name("fusec"))


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([FUSEC, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_generate_chat_names_paris():
    res = run("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "24")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert len(res.stdout.split()) >= 4  # a sentence, not a bare word


@pytest.mark.slow
def test_generate_several_prompts_seeded_sampling():
    args = ("generate", "--prompt", "Once upon a time", "--prompt", "The ocean is", "--max-tokens", "8",
            "--temperature", "0.8", "--seed", "11")
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout.count("=== prompt") == 2


def test_info_lists_default_model_and_backends():
    res = run("info")
    assert res.returncode == 0, res.stderr
    assert "SmolLM2-135M-Instruct" in res.stdout and ".gguf" in res.stdout
    assert "reference  yes" in res.stdout


def _bad_inputs(tmp: Path, tiny: Path, smollm2: Path) -> dict[str, tuple[list[str], str]]:
    gpt2 = tmp / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    broken_json = tmp / "broken_json"
    broken_json.mkdir()
    (broken_json / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    truncated_st = tmp / "truncated_st"
    shutil.copytree(tiny, truncated_st)
    st = truncated_st / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    garbage_st = tmp / "garbage_st"
    shutil.copytree(tiny, garbage_st)
    (garbage_st / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    truncated_gguf = tmp / "truncated.gguf"
    with smollm2.open("rb") as f:
        truncated_gguf.write_bytes(f.read(3_000_000))
    garbage_gguf = tmp / "garbage.gguf"
    garbage_gguf.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(8192))
    long_prompt = "hello " * 8300  # past SmolLM2's 8192-token context
    gen = ["generate", "--prompt", "hi", "--model"]
    return {
        "missing path": (gen + [str(tmp / "nope")], "does not exist"),
        # the refusal lists every supported architecture
        "unsupported architecture": (gen + [str(gpt2)], "unsupported architecture GPT2LMHeadModel; supported: "
                                     + ", ".join(HF_ARCHITECTURES)),
        "broken config.json": (gen + [str(broken_json)], "config.json"),
        "truncated safetensors": (gen + [str(truncated_st)], "corrupt or truncated safetensors"),
        "garbage safetensors": (gen + [str(garbage_st)], "corrupt or truncated safetensors"),
        "truncated gguf": (gen + [str(truncated_gguf)], "corrupt or truncated GGUF"),
        "garbage gguf": (gen + [str(garbage_gguf)], "corrupt or truncated GGUF"),
        "no tokenizer": (gen + [str(tiny)], "no tokenizer"),
        "prompt longer than context": (["generate", "--prompt", long_prompt], "the context holds 8192"),
        "prompt longer than --max-model-len": (
            ["generate", "--max-model-len", "4", "--prompt", "a prompt of more than four tokens"], "context holds 4"),
        "bad option value": (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
        "no CUDA device": (["generate", "--device", "cuda", "--prompt", "x"],
                           "no CUDA device found; use --device cpu"),
        "auto tool choice without a parser": (["serve", "--enable-auto-tool-choice"], "needs --tool-call-parser"),
        "unknown tool-call parser": (["serve", "--tool-call-parser", "nope"], "--tool-call-parser"),
    }


CASES = ["missing path", "unsupported architecture", "broken config.json", "truncated safetensors",
         "garbage safetensors", "truncated gguf", "garbage gguf", "no tokenizer", "prompt longer than context",
         "prompt longer than --max-model-len", "bad option value", "no CUDA device",
         "auto tool choice without a parser", "unknown tool-call parser"]


USAGE_ERRORS = {"bad option value", "auto tool choice without a parser", "unknown tool-call parser"}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_checkpoints, smollm2_path):
    return _bad_inputs(tmp_path_factory.mktemp("bad"), tiny_checkpoints["llama"], smollm2_path)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(bad_inputs, case):
    args, expected = bad_inputs[case]
    res = run(*args)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    if case not in USAGE_ERRORS:  # click's usage errors carry a usage line too
        assert len(lines) == 1, res.stderr
    assert expected in res.stderr
    assert res.stdout == ""


def test_compile_then_serve_with_the_same_flags_misses_no_kernel(tiny_checkpoints, tmp_path, monkeypatch):
    """`fusec compile --arch host` builds exactly the kernels `fusec serve` (same flags)
    loads at startup: the server finds every one of them in the cache."""
    import re

    from server_helpers import LiveServer

    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path / "cache"))
    flags = ["--model", str(tiny_checkpoints["llama"]), "--max-model-len", "64", "--block-size", "8"]
    res = run("compile", "--arch", "host", *flags)
    assert res.returncode == 0, res.stderr
    built = re.search(r"kernels: (\d+) distinct, 0 cache hits, (\d+) misses", res.stdout)
    assert built and built[1] == built[2], res.stdout
    server = LiveServer(*flags, "--device", "cpu")
    try:
        banner = next(line for line in server.output().splitlines() if line.startswith("fusec serving"))
    finally:
        server.stop()
    assert f"kernels: {built[1]} cache hits, 0 misses" in banner, banner
