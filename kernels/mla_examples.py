"""Example graphs for the MLA patterns (kernels/mla.py), as kernels/examples.py's.

Sizes 0 and 1 are decode-sized steps (the gemv bucket), size 2 a prefill (the gemm
bucket): every MLA pattern serves both. Heads and cache block sizes come from
examples.SIZES (2, 3 and 20 heads: the widest attention groups its heads over several
blocks); latent ranks and rope dims are odd past size 0, so loads of 16 bytes apply
only where the shapes allow. RoPE by size: interleaved (DeepSeek's layout), the same
with an attention factor (YaRN's mscale), rotate-half over part of each head.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Graph
from fusec.kernels.examples import SIZES, Example, _act, _paged_metadata

# latent rank, rope dims a head (rotated: rot), q_nope dims a head, value dims a head
MLA_SIZES = [dict(rank=24, rope=8, rot=8, nope=16, v=16), dict(rank=22, rope=6, rot=6, nope=10, v=14),
             dict(rank=23, rope=10, rot=6, nope=12, v=9)]
TOKENS = [1, 3, 17]  # decode, a few tokens, past the crossover of 8 (the gemm bucket)
WRITE_TOKENS = [2, 5, 11]  # the cache writes: one token of each is padding (slot -1)
EPS = 1e-6


def _rope(g: Graph, x: str, positions: str, size: int, heads: int, dtype: DType, name: str) -> str:
    m = MLA_SIZES[size]
    rot = m["rot"]
    inv_freq = tuple(float(f) for f in 1.0 / (10000.0 ** (np.arange(0, rot, 2) / rot)))
    return g.op("rope", [x, positions], ("T", heads * m["rope"]), dtype, name=name, n_heads=heads,
                head_dim=m["rope"], inv_freq=inv_freq, scale=[1.0, 1.19, 1.0][size], interleaved=size < 2)


def _cols(g: Graph, src: str, start: int, width: int, dtype: DType, name: str) -> str:
    return g.op("slice", [src], ("T", width), dtype, name=name, start=start, stop=start + width)


def _latent_write(with_q: bool):
    """The latent and k_pe slices of a down-projection's output written into the cache;
    q_pe a slice of the same output (V2-Lite) or of another value (V2's q_lora path)."""
    def build(rng, size: int, dtype: DType) -> Example:
        s, m = SIZES[size], MLA_SIZES[size]
        h, bs, rank, dr = s["h"], s["bs"], m["rank"], m["rope"]
        t = WRITE_TOKENS[size]
        g, inputs = Graph("example"), {}
        q_cols = h * (m["nope"] + dr)
        lead = q_cols if with_q else 7 + size  # columns before the latent: q, or V2's q_lora latent
        cols = lead + rank + dr
        # the slices must meet at an op (as at the down-projection GEMV in a model): matching
        # searches along op-to-op edges only
        a = g.op("add", [_act(g, rng, "a0", t, cols, dtype, inputs), _act(g, rng, "a1", t, cols, dtype, inputs)],
                 ("T", cols), dtype, name="a")
        q_src = a if with_q else _act(g, rng, "q", t, q_cols, dtype, inputs)
        inputs["positions"] = rng.integers(0, 200, t).astype(np.int32)
        positions = g.input("positions", ("T",))
        num_blocks = 4 * t
        slots = rng.choice(num_blocks * bs, size=t, replace=False).astype(np.int32)
        slots[t // 2] = -1  # a padding token: nothing written
        inputs["slot_mapping"] = slots
        latent = g.op("rms_norm", [_cols(g, a, lead, rank, dtype, "c"), g.weight("kv_a_norm", (rank,), dtype)],
                      ("T", rank), dtype, name="latent", eps=EPS)
        k_pe = _rope(g, _cols(g, a, lead + rank, dr, dtype, "kpe"), positions, size, 1, dtype, "k_rope")
        q_pe = _rope(g, _cols(g, q_src, h * m["nope"], h * dr, dtype, "q_pe"), positions, size, h, dtype, "q_rope")
        shape = (1, "NB", bs, 1, rank + dr)
        cache = g.op("latent_write", [latent, k_pe, g.state("cache", shape, dtype), g.input("slot_mapping", ("T",))],
                     shape, dtype, name="latent_write")
        g.set_outputs(q_pe, cache)
        return Example(g, inputs, {"NB": num_blocks})
    return build


def _slice_rope(rng, size: int, dtype: DType) -> Example:
    """q_pe's rope from the q up-projection's output (V2's q_lora path)."""
    s, m = SIZES[size], MLA_SIZES[size]
    h, t = s["h"], TOKENS[size]
    g, inputs = Graph("example"), {}
    q = _act(g, rng, "q", t, h * (m["nope"] + m["rope"]), dtype, inputs)
    inputs["positions"] = rng.integers(0, 200, t).astype(np.int32)
    q_pe = _cols(g, q, h * m["nope"], h * m["rope"], dtype, "q_pe")
    g.set_outputs(_rope(g, q_pe, g.input("positions", ("T",)), size, h, dtype, "q_rope"))
    return Example(g, inputs)


def _head_gemv(sliced: bool):
    """Sliced: q_nope's absorption (x a slice of the down-projection's output, at a column
    offset, w[heads * rank, nope]); else the value up-projection (w[heads * v, rank])."""
    def build(rng, size: int, dtype: DType) -> Example:
        s, m = SIZES[size], MLA_SIZES[size]
        h, t = s["h"], TOKENS[size]
        g, inputs = Graph("example"), {}
        if sliced:
            k, n = m["nope"], m["rank"]
            lead, tail = [16, 3, 4][size], [8, 5, 4][size]  # offsets that allow 16-byte loads in sizes 0 and 2
            x = _cols(g, _act(g, rng, "a", t, lead + h * k + tail, dtype, inputs), lead, h * k, dtype, "q_nope")
        else:
            k, n = m["rank"], m["v"]
            x = _act(g, rng, "x", t, h * k, dtype, inputs)
        y = g.op("head_matmul", [x, g.weight("w", (h * n, k), dtype)], ("T", h * n), dtype, name="y", heads=h)
        g.set_outputs(y)
        return Example(g, inputs)
    return build


def _mla_attention(rng, size: int, dtype: DType) -> Example:
    s, m = SIZES[size], MLA_SIZES[size]
    h, bs, rank, dr = s["h"], s["bs"], m["rank"], m["rope"]
    # decode; mixed with contexts past one 128-key GPU tile; a prefill of several sequences
    new, ctx = [[1], [2, 1, 3], [4, 1, 1, 7]][size], [[5], [2, 300, 141], [4, 40, 17, 30]][size]
    g, inputs = Graph("example"), {}
    num_blocks = _paged_metadata(rng, s, new, ctx, inputs)
    t = sum(new)
    q_latent = _act(g, rng, "q_latent", t, h * rank, dtype, inputs)
    q_pe = _act(g, rng, "q_pe", t, h * dr, dtype, inputs)
    cache = g.state("cache", (1, "NB", bs, 1, rank + dr), dtype)
    meta = [g.input("block_tables", ("S", "B")), g.input("context_lens", ("S",)), g.input("query_start_loc", ("S1",))]
    out = g.op("mla_attention", [q_latent, q_pe, cache, *meta], ("T", h * rank), dtype, name="attn", n_heads=h,
               scale=(m["nope"] + dr) ** -0.5)
    g.set_outputs(out)
    return Example(g, inputs, {"NB": num_blocks})


def _slice_row(norm: bool):
    """A slice of a wider row, alone or RMS-normed and projected (V2's q_lora latent)."""
    def build(rng, size: int, dtype: DType) -> Example:
        s = SIZES[size]
        t, k = TOKENS[size], s["k"]
        g, inputs = Graph("example"), {}
        start = 0 if norm else 5 + size
        x = _cols(g, _act(g, rng, "a", t, start + k + 13, dtype, inputs), start, k, dtype, "x")
        if norm:
            x = g.op("rms_norm", [x, g.weight("norm_w", (k,), dtype)], ("T", k), dtype, name="norm", eps=EPS)
            x = g.op("matmul", [x, g.weight("w", (s["n"], k), dtype)], ("T", s["n"]), dtype, name="proj")
        g.set_outputs(x)
        return Example(g, inputs)
    return build


EXAMPLES: dict[str, Callable[[np.random.Generator, int, DType], Example]] = {
    "latent_q_rope_write": _latent_write(with_q=True),
    "latent_rope_write": _latent_write(with_q=False),
    "mla_paged_attention": _mla_attention,
    "slice_rope": _slice_rope,
    "slice_rms_norm": _slice_row(norm=True),
    "slice_head_gemv": _head_gemv(sliced=True),
    "head_gemv": _head_gemv(sliced=False),
    "slice": _slice_row(norm=False),
}
