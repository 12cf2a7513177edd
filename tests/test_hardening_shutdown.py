"""Shutdown with long streams running: SIGTERM drains for --shutdown-timeout seconds, then
every stream still open gets a last chunk (finish_reason "abort") and `[DONE]`; a second
signal does that at once. No tracebacks, exit code 0, every client sees a well-formed end."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from server_helpers import LiveServer, write_tiny_chat_model

pytestmark = pytest.mark.slow

STREAMS = 20
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_path):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tinychat"), smollm2_path)


class Client(threading.Thread):
    """One long streaming request (completions or chat); keeps every `data:` line."""

    def __init__(self, url: str, index: int) -> None:
        super().__init__(name=f"client-{index}")
        self.chat = index % 2 == 1
        self.url = url
        self.index = index
        self.lines: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        common = {"max_tokens": MAX_MODEL_LEN - 40, "ignore_eos": True, "stream": True, "temperature": 0}
        if self.chat:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Story {self.index}"}]}
        else:
            path, body = "/v1/completions", {"prompt": [5 + self.index, 6, 7, 8]}
        try:
            with httpx.stream("POST", self.url + path, json={**body, **common}, timeout=120) as res:
                assert res.status_code == 200, res.read()
                self.lines.extend(line for line in res.iter_lines() if line.startswith("data: "))
        except BaseException as e:  # the assertion in the test reports it
            self.error = e

    def tokens(self) -> int:
        return sum(1 for line in self.lines if line.startswith("data: {") and self._text(json.loads(line[6:])))

    def finish_reason(self) -> str | None:
        """The last chunk's finish_reason; None unless the stream ended with it and `[DONE]`."""
        if len(self.lines) < 2 or self.lines[-1] != "data: [DONE]":
            return None
        choices = json.loads(self.lines[-2][6:])["choices"]
        return choices[0]["finish_reason"] if choices else None

    def _text(self, chunk: dict) -> str:
        choice = (chunk.get("choices") or [{}])[0]
        return (choice.get("delta") or {}).get("content") or "" if self.chat else choice.get("text") or ""


def start_streams(tiny_model, *flags: str) -> tuple[LiveServer, list[Client]]:
    # two at a time: most streams are still running or queued when the signal comes
    server = LiveServer("--model", str(tiny_model), "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "2",
                        *flags)
    clients = [Client(server.url, i) for i in range(STREAMS)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + 60
    while server.metrics().get("vllm:generation_tokens_total", 0) < 10:
        assert time.monotonic() < deadline, "no stream started"
        time.sleep(0.05)
    return server, clients


def check_ending(server: LiveServer, clients: list[Client]) -> tuple[dict[str, int], str]:
    for c in clients:
        c.join(timeout=60)
        assert not c.is_alive(), f"{c.name} still streaming"
        assert c.error is None, f"{c.name}: {c.error!r}"
    code, out = server.stop()
    assert code == 0, out
    assert "Traceback" not in out and "CancelledError" not in out and "Cancel " not in out, out
    reasons: dict[str, int] = {}
    for c in clients:
        reason = c.finish_reason()
        assert reason in ("length", "abort"), f"{c.name} ended without a final chunk and [DONE]: {c.lines[-3:]}"
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons, out


def test_sigterm_past_the_drain_deadline_ends_every_stream_with_abort_and_done(tiny_model):
    server, clients = start_streams(tiny_model, "--shutdown-timeout", "1")
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    reasons, out = check_ending(server, clients)
    took = time.monotonic() - signalled
    # the streams ran on through the drain, then the deadline ended them
    assert reasons.get("abort", 0) >= STREAMS // 2, reasons
    assert 1 <= took < 20, took
    assert "aborting" in out and "the server is shutting down" in out


def test_second_signal_ends_the_streams_at_once(tiny_model):
    server, clients = start_streams(tiny_model, "--shutdown-timeout", "600")
    server.proc.send_signal(signal.SIGTERM)
    before = sum(c.tokens() for c in clients)
    time.sleep(1.0)
    assert sum(c.tokens() for c in clients) > before, "streams stopped during the drain"
    assert server.proc.poll() is None  # still draining
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    reasons, _ = check_ending(server, clients)
    assert time.monotonic() - signalled < 15
    assert reasons.get("abort", 0) >= STREAMS // 2, reasons
