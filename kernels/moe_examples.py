"""Example graphs for the MoE patterns (kernels/moe.py), as kernels/examples.py's.

The router's examples are decode steps at sizes 0 and 1 (the gemv bucket) and a
prefill at size 2 (the gemm bucket): it serves both. The expert GEMVs' are decode steps,
moe_gemm's batches past the crossover. Routings by size: plain top-k with scaled weights; shared
slots with a sigmoid gate and renormalized weights; group-limited top-k, renormalized
and scaled. The expert GEMVs read x shared by the slots or one part per slot, their
outputs side by side or combined.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Graph
from fusec.kernels.examples import GEMM_ROWS, SIZES, Example, _act

ROUTINGS = [dict(experts=8, top_k=2, scaling=1.5),
            dict(experts=12, top_k=3, shared=2, shared_gate=True, renormalize=True),
            dict(experts=16, top_k=4, n_group=4, topk_group=2, renormalize=True, scaling=2.5)]
# the expert GEMVs' examples: (experts, slots, combine, per_slot) by size
EXPERT_SHAPES = [(4, 2, False, False), (6, 3, True, True), (5, 2, True, False)]


def tokens(size: int) -> int:
    return GEMM_ROWS[size] if size == 2 else SIZES[size]["t"]


def route_graph(g: Graph, x: str, k: int, dtype: DType, routing: dict, name: str = "route") -> str:
    """moe_route of x[T, k] with a router weight of its own."""
    rows = routing["experts"] + routing.get("shared_gate", False)
    slots = routing["top_k"] + routing.get("shared", 0)
    return g.op("moe_route", [x, g.weight("w_router", (rows, k), dtype)], ("T", 2 * slots), DType.F32, name=name,
                **routing)


def random_route(rng: np.random.Generator, t: int, experts: int, slots: int,
                 among: np.ndarray | None = None) -> np.ndarray:
    """route[t, 2 * slots]: distinct expert ids a token (from `among`, default all), then
    positive weights."""
    pool = np.arange(experts) if among is None else among
    ids = np.stack([rng.permutation(pool)[:slots] for _ in range(t)]).astype(np.float32)
    return np.concatenate([ids, (0.2 + rng.random((t, slots))).astype(np.float32)], axis=1)


def _route(fused: bool):
    def build(rng, size: int, dtype: DType) -> Example:
        t, k = tokens(size), SIZES[size]["k"]
        g, inputs = Graph("example"), {}
        x = _act(g, rng, "a", t, k, dtype, inputs)
        outs = []
        if fused:
            s = g.op("add", [x, _act(g, rng, "b", t, k, dtype, inputs)], ("T", k), dtype, name="sum")
            x = g.op("rms_norm", [s, g.weight("norm_w", (k,), dtype)], ("T", k), dtype, name="norm", eps=1e-5)
            outs = [s, x]
        g.set_outputs(route_graph(g, x, k, dtype, ROUTINGS[size]), *outs)
        return Example(g, inputs)
    return build


def expert_graph(rng, size: int, dtype: DType, act: str | None, weight_format: str | None = None,
                 k: int | None = None, among: np.ndarray | None = None, gemm: bool = False) -> Example:
    """moe_matmul of a random route (an input), after the gated activation `act` if
    given; K, the weight's format and the experts routed to can be overridden; `gemm`:
    a batch past the crossover at every size."""
    s = SIZES[size]
    t, k, n = GEMM_ROWS[size] if gemm else s["t"], k or s["k"], s["n"]
    experts, slots, combine, per_slot = EXPERT_SHAPES[size]
    g, inputs = Graph("example"), {}
    width = slots * k if per_slot else k
    if act is None:
        x = _act(g, rng, "x", t, width, dtype, inputs)
    else:
        gu = _act(g, rng, "gu", t, 2 * width, dtype, inputs)
        x = g.op(act, [gu], ("T", width), dtype, name="act", groups=slots if per_slot else 1)
    inputs["route"] = random_route(rng, t, experts, slots, among)
    route = g.input("route", ("T", 2 * slots), DType.F32)
    w = g.weight("w", (experts * n, k), dtype, format=weight_format)
    y = g.op("moe_matmul", [x, route, w], ("T", n if combine else slots * n), dtype, name="moe", experts=experts,
             slots=slots, combine=combine)
    g.set_outputs(y)
    return Example(g, inputs)


EXAMPLES: dict[str, Callable[[np.random.Generator, int, DType], Example]] = {
    "moe_route": _route(fused=False),
    "add_rms_norm_moe_route": _route(fused=True),
    "moe_gemv": lambda rng, size, dtype: expert_graph(rng, size, dtype, None),
    "moe_gemm": lambda rng, size, dtype: expert_graph(rng, size, dtype, None, gemm=True),
    "silu_mul_moe_gemv": lambda rng, size, dtype: expert_graph(rng, size, dtype, "silu_mul"),
    "gelu_tanh_mul_moe_gemv": lambda rng, size, dtype: expert_graph(rng, size, dtype, "gelu_tanh_mul"),
}
