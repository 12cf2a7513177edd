"""Host graphs: a decode step's launches recorded (not run) and compiled into one native
step that every host thread runs, meeting at barriers; the same results as eager steps."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import run_requests
from test_patterns import cache  # noqa: F401 (the module's kernel cache fixture)
from fusec.fusion.dtypes import DType
from fusec.kernels.elementwise import Add, GatherRows
from fusec.models.loader import load_model
from fusec.runtime.backends.cpu import HostDevice
from fusec.runtime.config import EngineConfig
from fusec.runtime.engine import LLMEngine
from fusec.runtime.sequence import SamplingParams


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_capture_records_and_replay_runs_in_order(threads, cache):
    """s = a + b, then y = s[reversed rows]: the second launch reads rows other threads
    wrote, so a missing barrier between them shows as NaN (poisoned) or stale rows."""
    device = HostDevice(cache, threads=threads)
    rng = np.random.default_rng(threads)
    rows, cols = 64, 48
    a, b = (rng.standard_normal((rows, cols)).astype(np.float32) for _ in range(2))
    order = np.arange(rows - 1, -1, -1, dtype=np.int32)
    s = np.full((rows, cols), np.nan, np.float32)
    y = np.full((rows, cols), np.nan, np.float32)
    add, gather = Add(cols, DType.F32), GatherRows(cols, DType.F32)
    calls = [device.prepare_launch(add, [a, b, s, np.int32(rows)], (rows, 1)),
             device.prepare_launch(gather, [s, order, y, np.int32(rows)], (rows, 1))]
    graph = device.capture(lambda: [call() for call in calls])
    assert np.isnan(s).all() and np.isnan(y).all()  # recorded, not run
    for _ in range(20):  # replays reuse the barrier's state
        y.fill(np.nan)
        device.replay(graph)
        np.testing.assert_array_equal(y, (a + b)[::-1])
    device.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_graphs_equal_eager_steps(threads, tiny_checkpoints, cache):
    model = load_model(str(tiny_checkpoints["qwen2"]))
    prompts = [[5, 3, 8, 1, 9, 2], [7, 7, 1], [4, 2, 6, 6, 1, 3, 9, 8, 2]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for eager in (True, False):
        device = HostDevice(cache, threads=threads)
        engine = LLMEngine(EngineConfig(enforce_eager=eager, max_num_seqs=4), model=model, device=device)
        assert bool(engine.runner.graph_buckets) is not eager
        outputs[eager] = [out.outputs[0].token_ids for out in run_requests(engine, prompts, params)]
        engine.close()
        device.close()
    assert outputs[False] == outputs[True]


def test_one_program_serves_every_shape(cache):
    """Captures of the same launch sequence at other sizes (so other grids, thread
    splits and barriers) compile once and replay correctly from their own tables; an
    f32 argument travels through the table by its bits."""
    device = HostDevice(cache, threads=2)
    rng = np.random.default_rng(7)
    cols = 40
    add, gather = Add(cols, DType.F32), GatherRows(cols, DType.F32)
    graphs, keep = [], []  # keep: a graph holds raw addresses, not the arrays
    for rows in (64, 5, 1, 33):  # 5 and 1 rows run on one thread: no barrier between the launches
        a, b = (rng.standard_normal((rows, cols)).astype(np.float32) for _ in range(2))
        order = rng.permutation(rows).astype(np.int32)
        s, y = np.full((rows, cols), np.nan, np.float32), np.full((rows, cols), np.nan, np.float32)
        calls = [device.prepare_launch(add, [a, b, s, np.int32(rows)], (rows, 1)),
                 device.prepare_launch(gather, [s, order, y, np.int32(rows)], (rows, 1))]
        graphs.append((device.capture(lambda: [call() for call in calls]), a + b, order, y))
        keep += [a, b, s]
    assert len({id(graph.program) for graph, *_ in graphs}) == 1
    for _ in range(3):
        for graph, total, order, y in graphs:
            y.fill(np.nan)
            device.replay(graph)
            np.testing.assert_array_equal(y, total[order])
    device.close()


def test_prefill_steps_replay_the_decode_program(tiny_checkpoints, cache):
    """With graphs on, a prefill (any length up to the crossover) runs as a table for the
    program the decode graphs compiled, not as pool launches; its tokens are checked
    against eager steps in test_decode_graphs_equal_eager_steps."""
    model = load_model(str(tiny_checkpoints["qwen2"]))
    device = HostDevice(cache, threads=2)
    engine = LLMEngine(EngineConfig(max_num_seqs=2), model=model, device=device)
    replays = []
    replay = device.replay
    device.replay = lambda graph: (replays.append(graph), replay(graph))
    run_requests(engine, [[5, 3, 8, 1, 9, 2, 4, 4, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(replays) == 3  # the prefill, then two decode steps
    assert len({id(graph.program) for graph in replays}) == 1
    assert (replays[0].table != replays[1].table).any()  # the prefill's own arguments and grids
    engine.close()
    device.close()
