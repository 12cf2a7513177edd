"""Device memory planning (the CUDA backend's arena and KV sizing), checked on the CPU."""
from __future__ import annotations

import numpy as np
import pytest

from fusec.errors import InputError
from fusec.fusion.codegen.target import parse_arch
from fusec.fusion.plan import PlanOptions, build_plans
from fusec.kernels.registry import default_registry
from fusec.models.loader import load_model
from fusec.runtime.memory import ALIGN, MemoryUse, arena_layout, kv_blocks_for_memory, max_dims
from fusec.runtime.device import GemmShape
from fusec.fusion.dtypes import DType


def test_arena_holds_every_value_without_overlap(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["qwen2"]), dtype="f16", with_weights=False)
    graph = model.graph(16)
    plans = build_plans(graph, default_registry(), PlanOptions(parse_arch("sm_90"), 512, crossover=8))
    dims = max_dims(256, 32, 512, 16)
    assert dims == {"T": 256, "S": 32, "S1": 33, "L": 32, "B": 32}
    layout = arena_layout(graph, plans, dims)

    def nbytes(name):
        t = graph.node(name).type
        return int(np.prod(t.bind(dims))) * t.dtype.itemsize

    regions = [(layout.inputs[n.name], nbytes(n.name)) for n in graph.nodes("input")]
    ends = [a + n for a, n in regions]
    assert max(ends) <= min(layout.slots.values())  # plans' slots start after the inputs
    for bucket, plan in plans.items():
        spans = {}
        for value, slot in plan.slots.items():
            at = layout.slots[(bucket, slot)]
            assert at % ALIGN == 0 and at + nbytes(value) <= layout.size
            lo, hi = spans.get(slot, (at, at))
            spans[slot] = (at, max(hi, at + nbytes(value)))
        ordered = sorted(spans.values())
        for (_, end), (start, _) in zip(ordered, ordered[1:]):
            assert end <= start, "two slots of one plan overlap"
    # the slots are reused: the arena is far smaller than one buffer per value
    per_value = sum(nbytes(v) for plan in plans.values() for v in plan.slots)
    assert layout.size < per_value / 3


def test_kv_blocks_from_gpu_memory_utilization():
    gib = 2 ** 30
    # 80 GiB card; the engine placed 20 GiB (weights, arena, sampler): 0.9 leaves 52 GiB
    ours = MemoryUse(free_before=80 * gib, free_after=60 * gib, total=80 * gib)
    assert kv_blocks_for_memory(ours, 0.9, gib // 2, 10) == 104
    with pytest.raises(InputError, match="--gpu-memory-utilization 0.2 leaves 0.00 GiB"):
        kv_blocks_for_memory(ours, 0.2, gib // 2, 10)


def test_kv_blocks_leave_other_processes_memory_alone():
    """Another server holds 40 GiB: a second one at 0.4 still gets its share (only what
    it placed itself counts against it), and no budget passes what is free."""
    gib = 2 ** 30
    second = MemoryUse(free_before=40 * gib, free_after=30 * gib, total=80 * gib)
    assert kv_blocks_for_memory(second, 0.4, gib // 2, 10) == 44  # 32 - 10 GiB
    assert kv_blocks_for_memory(second, 0.9, gib // 2, 10) == 60  # 62 GiB wanted, 30 free


def test_gemm_layouts_are_the_row_major_product_read_column_major():
    """y[T, N] = x[T, K] @ w[N, K].T as y.T = op_T(w) @ x.T in column-major terms: check the
    (rows, cols, ld) triples with numpy's own column-major views."""
    T, N, K = 5, 7, 3
    layouts = GemmShape(T, N, K, DType.F16).layouts()
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((T, K)), rng.standard_normal((N, K))

    def col_major(buf, rows, cols, ld):
        return np.lib.stride_tricks.as_strided(buf, (rows, cols), (8, 8 * ld))

    a = col_major(w.ravel(), *layouts["a"])  # [K, N]
    b = col_major(x.ravel(), *layouts["b"])  # [K, T]
    y = np.zeros(T * N)
    d = col_major(y, *layouts["d"])  # [N, T]
    d[...] = a.T @ b
    np.testing.assert_allclose(y.reshape(T, N), x @ w.T)
