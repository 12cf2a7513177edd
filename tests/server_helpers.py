"""Start and stop a real `fusec serve` on loopback for tests."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

_SCRIPT = Path(sys.executable).with_name("fusec")
# the console script beside the interpreter, or the module where fusec is installed
# without one on PATH (a --target install on a GPU machine)
FUSEC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fusec.cli.main"]
# extra `fusec serve` flags for every test server: FUSEC_TEST_SERVE_ARGS="--device cuda"
# runs the server tests on a GPU (bench/gpu_check.sh)
SERVE_ARGS = shlex.split(os.environ.get("FUSEC_TEST_SERVE_ARGS", ""))


def offline_engine_args() -> dict:
    """The test servers' device flags as `LLM` keyword arguments, for an offline engine
    the tests compare a server with (on a GPU it must share the card with the servers)."""
    flags = dict(zip(SERVE_ARGS[::2], SERVE_ARGS[1::2]))
    kwargs: dict = {}
    if "--device" in flags:
        kwargs["device"] = flags["--device"]
    if "--gpu-memory-utilization" in flags:
        kwargs["gpu_memory_utilization"] = float(flags["--gpu-memory-utilization"])
    return kwargs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, *args: str, startup_timeout: float = 120, command: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # output goes to a file: an unread pipe fills up and blocks the server's logging
        self.log = tempfile.NamedTemporaryFile(mode="w+", prefix="fusec-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([*(command or FUSEC), "serve", "--port", str(self.port), *args, *SERVE_ARGS],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start")

    def metrics(self) -> dict[str, float]:
        """Each `vllm:` sample's value by its name, summed over its label sets."""
        values: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:") and " " in line:
                name, value = line.rsplit(" ", 1)
                name = name.split("{")[0]
                values[name] = values.get(name, 0.0) + float(value)
        return values

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        out = self.output()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        return self.proc.returncode, out


@contextlib.contextmanager
def serve_in_process(engine, startup_timeout: float = 60) -> Iterator[str]:
    """The app over this LLMEngine on uvicorn in a thread of the test process (a test can
    reach into the engine): its URL; everything shut down at the end."""
    import threading

    import uvicorn

    from fusec.runtime.async_engine import AsyncEngine
    from fusec.runtime.server.app import ServerSettings, create_app

    app = create_app(AsyncEngine(engine), ServerSettings(["tiny"]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.engine.shutdown()


def serve_for_module(*args: str):
    """A module fixture's body: a server with these flags, stopped cleanly at the end."""
    server = LiveServer(*args)
    yield server
    code, err = server.stop()
    assert code == 0, err


def write_tiny_chat_model(path: Path, gguf: Path) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template: fast, and
    every endpoint (chat, tokenize) works on it."""
    import torch
    import transformers

    from fusec.models.gguf_file import GGUFFile
    from fusec.models.tokenizer import Tokenizer

    meta = GGUFFile(gguf).metadata
    tok = Tokenizer.from_gguf_metadata(meta, str(gguf))
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token}))
    return path
