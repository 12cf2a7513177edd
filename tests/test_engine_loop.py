"""The engine loop never holds up the event loop: with every engine step made to take
500 ms, /health and /metrics still answer at once, and a new request is taken by the
engine at the next step boundary and its stream starts then, not a step later."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from fusec.models.loader import load_model
from fusec.runtime.engine import EngineConfig, LLMEngine
from fusec.runtime.sequence import SamplingParams
from server_helpers import serve_in_process

STEP_S = 0.5
FAST_S = 0.05


@dataclass
class Timeline:
    """When each step ran and when each request reached the engine (monotonic seconds)."""
    steps: list[tuple[float, float]] = field(default_factory=list)
    added: dict[str, float] = field(default_factory=dict)
    stepping: threading.Event = field(default_factory=threading.Event)

    def step_at(self, t: float) -> int:
        return next(i for i, (start, end) in enumerate(self.steps) if start <= t <= end)


def warm_up(engine: LLMEngine, prompts: list[list[int]]) -> None:
    """Compile the plans of the batch shapes the test runs, so no step stalls on it."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"warm-{i}", None, params, prompt_token_ids=p)
    while engine.has_unfinished_requests():
        engine.step()


@pytest.fixture
def slow_server(tiny_checkpoints, monkeypatch):
    engine = LLMEngine(EngineConfig(), model=load_model(str(tiny_checkpoints["llama"])))
    warm_up(engine, [[5, 6, 7], [8, 9, 10]])
    timeline = Timeline()
    step, add_request = LLMEngine.step, LLMEngine.add_request

    def slow_step(self: LLMEngine):
        start = time.monotonic()
        timeline.stepping.set()
        time.sleep(STEP_S)
        try:
            return step(self)
        finally:
            timeline.steps.append((start, time.monotonic()))

    def recorded_add(self: LLMEngine, request_id: str, *args, **kwargs) -> None:
        timeline.added[request_id] = time.monotonic()
        add_request(self, request_id, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "step", slow_step)
    monkeypatch.setattr(LLMEngine, "add_request", recorded_add)
    with serve_in_process(engine, startup_timeout=30) as url:
        yield url, timeline


async def timed_get(http: httpx.AsyncClient, path: str) -> float:
    start = time.monotonic()
    res = await http.get(path)
    assert res.status_code == 200
    return time.monotonic() - start


async def stream_started(http: httpx.AsyncClient, body: dict) -> tuple[float, str]:
    """When the response headers came, and the last SSE line of the whole stream."""
    async with http.stream("POST", "/v1/completions", json=body) as res:
        assert res.status_code == 200
        started = time.monotonic()
        lines = [line async for line in res.aiter_lines() if line.startswith("data: ")]
    return started, lines[-1]


def test_slow_steps_do_not_hold_up_the_server(slow_server):
    url, timeline = slow_server
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            first = asyncio.create_task(stream_started(http, body))
            while not timeline.stepping.is_set():  # the first request's prefill step is running
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            posted = time.monotonic()
            second = asyncio.create_task(stream_started(http, {**body, "prompt": [8, 9, 10]}))
            latencies = []
            # probe until the engine has taken the second request: the whole time its
            # handler waits for a step boundary, the server must stay responsive
            while not any(rid.startswith("cmpl-") and t > posted for rid, t in timeline.added.items()):
                latencies += [await timed_get(http, "/health"), await timed_get(http, "/metrics")]
                await asyncio.sleep(0.02)
            assert len(latencies) >= 4 and max(latencies) < FAST_S, latencies
            started, last = await second
            await first
            assert last == "data: [DONE]"

            running = timeline.step_at(posted)
            step_end = timeline.steps[running][1]
            added = max(timeline.added.values())
            # taken between the step that was running and the next one
            assert step_end <= added <= timeline.steps[running + 1][0]
            # and its stream started then, before its own prefill step ended
            assert started - step_end < STEP_S / 2, (started - step_end)

    asyncio.run(main())
