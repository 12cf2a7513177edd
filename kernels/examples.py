"""Example graphs, one per registered pattern, for the registry-driven kernel tests.

`EXAMPLES[pattern](rng, size, dtype)` returns a small graph in which that pattern
matches, with inputs. Sizes 0..2 go from tiny to odd and wide: dims that are not
multiples of the vector width or of the GPU lane count. Weights and state are filled
by the test with random values. A new pattern adds its builder here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fusec.fusion.dtypes import DType, from_storage, to_storage
from fusec.fusion.ir import Graph

I32 = DType.I32
# (rows T, in K, out N, heads, kv heads, head dim, block size)
SIZES = [dict(t=1, k=1032, n=16, h=2, kv=1, hd=8, bs=4), dict(t=3, k=67, n=45, h=3, kv=3, hd=10, bs=5),
         dict(t=5, k=257, n=131, h=20, kv=2, hd=18, bs=16)]  # group 10: split over 2 blocks
GEMM_ROWS = [9, 17, 33]  # past the default crossover of 8


@dataclass
class Example:
    graph: Graph
    inputs: dict[str, np.ndarray]
    state_dims: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return next(v.shape[0] for k, v in self.inputs.items() if self.graph.node(k).type.shape[0] == "T")

    def bucket(self, crossover: int = 8) -> str:
        return "gemv" if self.tokens <= crossover else "gemm"


def _act(g: Graph, rng, name: str, rows: int, cols: int, dtype: DType, inputs: dict) -> str:
    inputs[name] = to_storage(rng.standard_normal((rows, cols)).astype(np.float32), dtype)
    return g.input(name, ("T", cols), dtype)


def _norm_gemv(add: bool, bias: bool, gather: bool, gemm: bool = False, post: bool = False, layer: bool = False):
    def build(rng, size: int, dtype: DType) -> Example:
        s = SIZES[size]
        t = GEMM_ROWS[size] if gemm else s["t"]
        k, n = s["k"], s["n"]
        g, inputs = Graph("example"), {}
        x = _act(g, rng, "a", t, k, dtype, inputs)
        if layer:  # rows with a mean to take away: a LayerNorm must centre them
            inputs["a"] = to_storage(from_storage(inputs["a"], dtype) + np.float32(3.0), dtype)
        outs = []
        if add:
            b = _act(g, rng, "b", t, k, dtype, inputs)
            if post:  # the block output b is normed before the residual add (Gemma 2)
                b = g.op("rms_norm", [b, g.weight("post_w", (k,), dtype)], ("T", k), dtype, name="post", eps=1e-5)
            x = g.op("add", [x, b], ("T", k), dtype, name="sum")
            if not gather:
                outs.append(x)
        if layer:
            x = g.op("layer_norm", [x, g.weight("norm_w", (k,), dtype), g.weight("norm_b", (k,), dtype)], ("T", k),
                     dtype, name="norm", eps=1e-5)
        else:
            x = g.op("rms_norm", [x, g.weight("norm_w", (k,), dtype)], ("T", k), dtype, name="norm", eps=1e-5)
        rows = "T"
        if gather:
            inputs["rows"] = np.sort(rng.choice(t, size=max(1, t // 2), replace=False)).astype(np.int32)
            x = g.op("gather_rows", [x, g.input("rows", ("L",))], ("L", k), dtype, name="gathered")
            rows = "L"
        if not gemm:
            x = g.op("matmul", [x, g.weight("w", (n, k), dtype)], (rows, n), dtype, name="proj")
            if bias:
                x = g.op("bias_add", [x, g.weight("bias", (n,), dtype)], (rows, n), dtype, name="biased")
        g.set_outputs(x, *outs)
        return Example(g, inputs)
    return build


def _gemv(prologue: str, bias: bool, gemm: bool = False):
    def build(rng, size: int, dtype: DType) -> Example:
        s = SIZES[size]
        t, k, n = (GEMM_ROWS[size] if gemm else s["t"]), s["k"], s["n"]
        g, inputs = Graph("example"), {}
        if prologue in ("silu_mul", "gelu_tanh_mul"):
            x = g.op(prologue, [_act(g, rng, "gu", t, 2 * k, dtype, inputs)], ("T", k), dtype, name="act")
        elif prologue == "gelu":
            x = g.op("gelu", [_act(g, rng, "u", t, k, dtype, inputs)], ("T", k), dtype, name="act")
        else:
            x = _act(g, rng, "x", t, k, dtype, inputs)
        y = g.op("matmul", [x, g.weight("w", (n, k), dtype)], ("T", n), dtype, name="proj")
        if bias:
            y = g.op("bias_add", [y, g.weight("bias", (n,), dtype)], ("T", n), dtype, name="biased")
        g.set_outputs(y)
        return Example(g, inputs)
    return build


def _paged_metadata(rng, s: dict, new: list[int], ctx: list[int], inputs: dict) -> int:
    """Block tables (scattered), context lengths and query starts; returns the block count."""
    bs = s["bs"]
    per_seq = [-(-c // bs) for c in ctx]
    num_blocks = sum(per_seq) + 3
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(ctx), max(per_seq)), np.int32)
    at = 0
    for i, nb in enumerate(per_seq):
        tables[i, :nb] = perm[at:at + nb]
        at += nb
    inputs["block_tables"] = tables
    inputs["context_lens"] = np.array(ctx, np.int32)
    inputs["query_start_loc"] = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    return num_blocks


def _example_cache_dtype(size: int, dtype: DType) -> DType:
    """The KV cache's dtype in the attention examples: 16 bits under float32 activations
    in sizes 1 (bf16) and 2 (f16), as --kv-cache-dtype makes it on the CPU; else dtype."""
    return {1: DType.BF16, 2: DType.F16}.get(size, dtype) if dtype is DType.F32 else dtype


def _rope_kv(rng, size: int, dtype: DType, qk_norm: str = "") -> Example:
    s = SIZES[size]
    h, kv, hd, bs = s["h"], s["kv"], s["hd"], s["bs"]
    t = s["t"] + 2
    g, inputs = Graph("example"), {}
    qs, kvs = h * hd, kv * hd
    # q, k and v must meet at an op (as at the QKV GEMV in a model): matching searches
    # along op-to-op edges only
    qkv = g.op("add", [_act(g, rng, "qkv_a", t, qs + 2 * kvs, dtype, inputs),
                       _act(g, rng, "qkv_b", t, qs + 2 * kvs, dtype, inputs)], ("T", qs + 2 * kvs), dtype, name="qkv")
    num_blocks = 4 * t
    inputs["positions"] = rng.integers(0, 200, t).astype(np.int32)
    slots = rng.choice(num_blocks * bs, size=t, replace=False).astype(np.int32)
    slots[t // 2] = -1  # a padding token: nothing written
    inputs["slot_mapping"] = slots
    pos = g.input("positions", ("T",))
    # the widest example turns only part of each head (partial rotary) and scales cos/sin; the middle one
    # pairs dims GPT-J's way (interleaved)
    interleaved = size == 1
    rot = hd if size < 2 else hd // 2 + (hd // 2) % 2
    inv_freq = tuple(float(f) for f in 1.0 / (10000.0 ** (np.arange(0, rot, 2) / rot)))
    scale = 1.0 if size < 2 else 1.19
    q = g.op("slice", [qkv], ("T", qs), dtype, name="q", start=0, stop=qs)
    k = g.op("slice", [qkv], ("T", kvs), dtype, name="k", start=qs, stop=qs + kvs)
    v = g.op("slice", [qkv], ("T", kvs), dtype, name="v", start=qs + kvs, stop=qs + 2 * kvs)
    if qk_norm:  # "head_rms_norm" (one weight row for all heads) or "head_layer_norm" (a row per head)
        per_head = qk_norm == "head_layer_norm"
        q = g.op(qk_norm, [q, g.weight("q_norm_w", (h, hd) if per_head else (hd,), dtype)], ("T", qs), dtype,
                 name="q_norm", eps=1e-6, head_dim=hd)
        k = g.op(qk_norm, [k, g.weight("k_norm_w", (kv, hd) if per_head else (hd,), dtype)], ("T", kvs), dtype,
                 name="k_norm", eps=1e-6, head_dim=hd)
    q = g.op("rope", [q, pos], ("T", qs), dtype, name="q_rope", n_heads=h, head_dim=hd, inv_freq=inv_freq,
             scale=scale, interleaved=interleaved)
    k = g.op("rope", [k, pos], ("T", kvs), dtype, name="k_rope", n_heads=kv, head_dim=hd, inv_freq=inv_freq,
             scale=scale, interleaved=interleaved)
    cache_dtype = _example_cache_dtype(size, dtype)
    cache = g.state("cache", (2, "NB", bs, kv, hd), cache_dtype)
    cache = g.op("kv_write", [k, v, cache, g.input("slot_mapping", ("T",))], (2, "NB", bs, kv, hd), cache_dtype,
                 name="kv_write")
    g.set_outputs(q, cache)
    return Example(g, inputs, {"NB": num_blocks})


def _attention(rng, size: int, dtype: DType) -> Example:
    s = SIZES[size]
    window = [0, 0, 9][size]  # the widest example also has a sliding window
    cap = [0.0, 2.5, 0.0][size]  # the middle one soft-caps its scores (Gemma 2)
    h, kv, hd, bs = s["h"], s["kv"], s["hd"], s["bs"]
    # size 1 has contexts past one 128-key GPU tile; size 2 a sliding window
    new, ctx = [[1], [2, 1, 3], [4, 1, 1, 7]][size], [[5], [2, 300, 141], [4, 40, 17, 30]][size]
    g, inputs = Graph("example"), {}
    num_blocks = _paged_metadata(rng, s, new, ctx, inputs)
    q = _act(g, rng, "q", sum(new), h * hd, dtype, inputs)
    cache = g.state("cache", (2, "NB", bs, kv, hd), _example_cache_dtype(size, dtype))
    meta = [g.input("block_tables", ("S", "B")), g.input("context_lens", ("S",)), g.input("query_start_loc", ("S1",))]
    out = g.op("attention", [q, cache, *meta], ("T", h * hd), dtype, name="attn", n_heads=h, n_kv_heads=kv,
               head_dim=hd, scale=hd ** -0.5, sliding_window=window or None, softcap=cap or None)
    g.set_outputs(out)
    return Example(g, inputs, {"NB": num_blocks})


def _embed(rng, size: int, dtype: DType) -> Example:
    s = SIZES[size]
    g = Graph("example")
    vocab = 3 * s["n"] + 1
    ids = rng.integers(0, vocab, s["t"] + 1).astype(np.int32)
    scale = [1.0, 1.0, 33.0][size]  # the widest scales its rows (Gemma's sqrt(hidden))
    out = g.op("embed", [g.input("token_ids", ("T",)), g.weight("table", (vocab, s["k"]), dtype)], ("T", s["k"]),
               dtype, name="emb", scale=scale)
    g.set_outputs(out)
    return Example(g, {"token_ids": ids})


def _row_op(kind: str, gemm: bool = True):
    def build(rng, size: int, dtype: DType) -> Example:
        s = SIZES[size]
        t, k = GEMM_ROWS[size] if gemm else s["t"], s["k"]
        g, inputs = Graph("example"), {}
        if kind in ("silu_mul", "gelu_tanh_mul"):
            out = g.op(kind, [_act(g, rng, "gu", t, 2 * k, dtype, inputs)], ("T", k), dtype, name="y")
        elif kind == "add":
            out = g.op("add", [_act(g, rng, "a", t, k, dtype, inputs), _act(g, rng, "b", t, k, dtype, inputs)],
                       ("T", k), dtype, name="y")
        elif kind == "gelu":
            out = g.op("gelu", [_act(g, rng, "x", t, k, dtype, inputs)], ("T", k), dtype, name="y")
        elif kind == "scale":
            out = g.op("scale", [_act(g, rng, "x", t, k, dtype, inputs)], ("T", k), dtype, name="y", factor=0.0625)
        elif kind == "softcap":
            out = g.op("softcap", [_act(g, rng, "x", t, k, dtype, inputs)], ("T", k), dtype, name="y", cap=1.5)
        elif kind == "bias_add":
            out = g.op("bias_add", [_act(g, rng, "x", t, k, dtype, inputs), g.weight("bias", (k,), dtype)],
                       ("T", k), dtype, name="y")
        else:  # gather_rows
            inputs["rows"] = rng.permutation(t)[: max(1, t // 3)].astype(np.int32)
            out = g.op("gather_rows", [_act(g, rng, "x", t, k, dtype, inputs), g.input("rows", ("L",))], ("L", k),
                       dtype, name="y")
        g.set_outputs(out)
        return Example(g, inputs)
    return build


EXAMPLES: dict[str, Callable[[np.random.Generator, int, DType], Example]] = {
    "add_rms_norm_gemv_bias": _norm_gemv(add=True, bias=True, gather=False),
    "add_rms_norm_gather_gemv": _norm_gemv(add=True, bias=False, gather=True),
    "add_rms_norm_gemv": _norm_gemv(add=True, bias=False, gather=False),
    "rms_norm_add_rms_norm_gemv": _norm_gemv(add=True, bias=False, gather=False, post=True),
    "rms_norm_add_rms_norm_gather_gemv": _norm_gemv(add=True, bias=False, gather=True, post=True),
    "rms_norm_gemv_bias": _norm_gemv(add=False, bias=True, gather=False),
    "rms_norm_gather_gemv": _norm_gemv(add=False, bias=False, gather=True),
    "rms_norm_gemv": _norm_gemv(add=False, bias=False, gather=False),
    "silu_mul_gemv": _gemv("silu_mul", bias=False),
    "gelu_tanh_mul_gemv": _gemv("gelu_tanh_mul", bias=False),
    "gelu_gemv": _gemv("gelu", bias=False),
    "gelu_gemv_bias": _gemv("gelu", bias=True),
    "gemv_bias": _gemv("none", bias=True),
    "gemv": _gemv("none", bias=False),
    "rope_kv_write": _rope_kv,
    "qk_norm_rope_kv_write": lambda rng, size, dtype: _rope_kv(rng, size, dtype, qk_norm="head_rms_norm"),
    "qk_layer_norm_rope_kv_write": lambda rng, size, dtype: _rope_kv(rng, size, dtype, qk_norm="head_layer_norm"),
    "paged_attention": _attention,
    "embed": _embed,
    "add_rms_norm": _norm_gemv(add=True, bias=False, gather=False, gemm=True),
    "rms_norm": _norm_gemv(add=False, bias=False, gather=False, gemm=True),
    "gemm": _gemv("none", bias=False, gemm=True),
    "bias_add": _row_op("bias_add"),
    "silu_mul": _row_op("silu_mul"),
    "gelu_tanh_mul": _row_op("gelu_tanh_mul"),
    "softcap": _row_op("softcap"),
    "scale": _row_op("scale"),
    "gelu": _row_op("gelu"),
    "gather_rows": _row_op("gather_rows"),
    "add": _row_op("add"),
}

# each plain-norm example again with a LayerNorm (the registry's layer_norm twins)
EXAMPLES |= {name.replace("rms_norm", "layer_norm"): _norm_gemv(**{**kw, "layer": True})
             for name, kw in {
                 "add_rms_norm_gemv_bias": dict(add=True, bias=True, gather=False),
                 "add_rms_norm_gather_gemv": dict(add=True, bias=False, gather=True),
                 "add_rms_norm_gemv": dict(add=True, bias=False, gather=False),
                 "rms_norm_gemv_bias": dict(add=False, bias=True, gather=False),
                 "rms_norm_gather_gemv": dict(add=False, bias=False, gather=True),
                 "rms_norm_gemv": dict(add=False, bias=False, gather=False),
                 "add_rms_norm": dict(add=True, bias=False, gather=False, gemm=True),
                 "rms_norm": dict(add=False, bias=False, gather=False, gemm=True)}.items()}

from fusec.kernels.mla_examples import EXAMPLES as MLA_EXAMPLES  # noqa: E402 (they build on the helpers above)
from fusec.kernels.moe_examples import EXAMPLES as MOE_EXAMPLES  # noqa: E402

EXAMPLES |= MOE_EXAMPLES | MLA_EXAMPLES
