"""AsyncEngine: concurrent streams, aborts, errors, shutdown."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fusec.errors import InputError
from fusec.models.loader import load_model
from fusec.runtime.async_engine import AsyncEngine, EngineLoad, EngineShutDown
from fusec.runtime.engine import EngineConfig, LLMEngine
from fusec.runtime.sequence import SamplingParams


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return load_model(str(tiny_checkpoints["llama"]))


@pytest.fixture
def start(model):
    """Start an AsyncEngine over the tiny model (EngineConfig keyword arguments); every
    one started is shut down after the test."""
    engines: list[AsyncEngine] = []

    def make(**config) -> AsyncEngine:
        engines.append(AsyncEngine(LLMEngine(EngineConfig(**config), model=model)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown()


async def wait_idle(engine: AsyncEngine) -> EngineLoad:
    """The engine thread applies aborts between steps: poll its load snapshot."""
    for _ in range(200):
        load = engine.load()
        if load.running == 0 and load.waiting == 0:
            break
        await asyncio.sleep(0.01)
    return load


def test_concurrent_streams_match_offline(model, start):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, int(rng.integers(2, 30))).tolist() for _ in range(12)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    offline = LLMEngine(EngineConfig(), model=model)
    for i, p in enumerate(prompts):
        offline.add_request(str(i), None, params, prompt_token_ids=p)
    want = {}
    while offline.has_unfinished_requests():
        for o in offline.step():
            want[o.request_id] = o.outputs[0].token_ids
    engine = start()

    async def one(i):
        steps = []
        async for out in engine.generate(None, params, request_id=str(i), prompt_token_ids=prompts[i]):
            steps.append(len(out.outputs[0].token_ids))
        assert steps == sorted(steps) and out.finished
        return out.outputs[0].token_ids

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    got = asyncio.run(main())
    assert got == [want[str(i)] for i in range(len(prompts))]
    assert engine.load().running == 0


def test_cancelled_consumer_aborts_request(start):
    engine = start()
    params = SamplingParams(temperature=0, max_tokens=90, ignore_eos=True)

    async def leave_early():
        stream = engine.generate(None, params, prompt_token_ids=list(range(30)))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await stream.aclose()  # what a server does when its client disconnects

    async def consume_forever():
        async for _ in engine.generate(None, params, prompt_token_ids=list(range(20))):
            await asyncio.sleep(0)

    async def main():
        tasks = [asyncio.create_task(consume_forever()) for _ in range(3)]
        await asyncio.gather(*(leave_early() for _ in range(5)))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        load = await wait_idle(engine)
        assert load.running == 0 and load.waiting == 0 and load.kv_usage == 0.0

    asyncio.run(main())


def test_bad_request_raises_before_streaming(start):
    engine = start(max_model_len=32)

    async def main():
        with pytest.raises(InputError):
            async for _ in engine.generate(None, SamplingParams(max_tokens=40), prompt_token_ids=[1, 2, 3]):
                pass
        outs = [o async for o in engine.generate(None, SamplingParams(max_tokens=3, temperature=0),
                                                 prompt_token_ids=[1, 2, 3])]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3

    asyncio.run(main())


def test_failed_step_fails_requests_in_flight_and_keeps_serving(start, monkeypatch):
    engine = start()
    step = LLMEngine.step
    calls = []

    def fail_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", fail_once)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in engine.generate(None, params, prompt_token_ids=[1, 2, 3]):
                pass
        outs = [o async for o in engine.generate(None, params, prompt_token_ids=[1, 2, 3])]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4

    asyncio.run(main())


def test_duplicate_id_is_refused_and_the_original_runs_on(start):
    engine = start()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def main():
        original = await engine.add_request("same", None, params, prompt_token_ids=[1, 2, 3])
        with pytest.raises(InputError, match="duplicate"):
            await engine.add_request("same", None, params, prompt_token_ids=[4, 5])
        outs = [o async for o in original]
        assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].outputs[0].token_ids) == 20

    asyncio.run(main())


def test_dropped_stream_aborts_its_request(start):
    """A response that never iterates its stream (the client left first) still frees it."""
    import gc

    engine = start()

    async def main():
        stream = await engine.add_request("dropped", None, SamplingParams(max_tokens=90, ignore_eos=True),
                                          prompt_token_ids=list(range(20)))
        del stream
        gc.collect()
        load = await wait_idle(engine)
        assert load.running == 0 and load.waiting == 0 and load.kv_usage == 0.0

    asyncio.run(main())


def test_shutdown_fails_requests_in_flight(model):
    engine = AsyncEngine(LLMEngine(EngineConfig(), model=model))

    async def main():
        stream = await engine.add_request("long", None, SamplingParams(max_tokens=90, ignore_eos=True),
                                          prompt_token_ids=[1, 2, 3])
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineShutDown):
            async for _ in stream:
                pass
        with pytest.raises(EngineShutDown):
            await engine.add_request("late", None, SamplingParams(), prompt_token_ids=[1])

    asyncio.run(main())


def test_end_all_gives_each_generation_its_last_output_and_refuses_new_requests(start):
    """What a draining server does at its deadline: a generation's stream ends with what it
    has (finish_reason "abort"), an embedding request fails, nothing new is taken."""
    from fusec.runtime.sequence import PoolingParams

    engine = start(max_num_seqs=1)  # the second generation waits in the queue

    async def main():
        params = SamplingParams(max_tokens=90, ignore_eos=True)
        running = await engine.add_request("running", None, params, prompt_token_ids=[1, 2, 3])
        waiting = await engine.add_request("waiting", None, params, prompt_token_ids=[4, 5, 6])
        first = await running.__anext__()
        pooled = await engine.add_request("pooled", None, PoolingParams(), prompt_token_ids=list(range(9)))
        engine.end_all()
        outs = [o async for o in running]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert outs[-1].outputs[0].token_ids[:len(first.outputs[0].token_ids)] == first.outputs[0].token_ids
        (last,) = [o async for o in waiting]
        assert last.finished and last.outputs[0].finish_reason == "abort" and last.outputs[0].token_ids == []
        with pytest.raises(EngineShutDown):
            async for _ in pooled:
                pass
        with pytest.raises(EngineShutDown):
            await engine.add_request("late", None, SamplingParams(), prompt_token_ids=[1])
        load = await wait_idle(engine)
        assert load.running == 0 and load.waiting == 0 and load.kv_usage == 0.0

    asyncio.run(main())
