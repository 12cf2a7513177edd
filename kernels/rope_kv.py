"""RoPE on q and k, then k and v written into the paged cache: one block per token.

Reads q|k|v from the fused QKV output by column offset (the slices fold in here);
cos/sin come from a float32 table [max_position, head_dim] (cos | sin halves) built
once from the graph's inverse frequencies, the same numbers the reference computes.
With `qk_norm` (Qwen3), each q and k head is RMS-normalised first (one reduction per
head), rounded to the activation dtype as the reference's head_rms_norm output is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from llvmlite import ir

from fusec.fusion.codegen.builder import KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.kernels.base import Kernel, round_to, row_offset


@dataclass(frozen=True)
class RopeKVWrite(Kernel):
    family = "rope_kv_write"
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_cols: int
    q_offset: int
    k_offset: int
    v_offset: int
    act: DType
    qk_norm: bool = False
    norm_eps: float = 0.0
    norm_weight: DType = DType.F32  # the q_norm / k_norm weights' dtype
    qk_layer: bool = False  # the head norms are bias-free LayerNorms with per-head weights (Cohere)
    rotary_dim: int = 0  # dims of each head that turn (partial rotary); 0: all
    interleaved: bool = False  # GPT-J's pairs (2j, 2j + 1) (Cohere) instead of (j, j + rot_half)
    cache: DType | None = None  # the KV cache's dtype (K and V rounded to it); None: act

    @property
    def kv(self) -> DType:
        return self.cache or self.act

    def params(self) -> list[Param]:
        names = ("qkv", "positions", "cos_sin", "slots", "k_cache", "v_cache", "q_out")
        if self.qk_norm:
            names += ("q_norm_w", "k_norm_w")
        return [Param(n, "ptr") for n in names] + [Param("num_tokens", "i32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return dims["num_tokens"], 1

    @property
    def rot_half(self) -> int:
        """Rotated pairs per head: a partial rotary embedding turns the first rotary_dim dims."""
        return (self.rotary_dim or self.head_dim) // 2

    def _rotate(self, kb: KernelBuilder, heads: int, src_off: int, store, norm_w: str) -> None:
        """Every head of q (or k) from the qkv row, [normalised,] rotated, stored."""
        b, hd = kb.b, self.head_dim
        t = kb.block_id(0)
        row = row_offset(kb, t, self.qkv_cols)
        pos = kb.load(kb["positions"], t, DType.I32)
        cs_row = row_offset(kb, pos, 2 * self.rot_half)

        def raw(h, j):
            return kb.load(kb["qkv"], b.add(row, kb.wide(b.add(b.mul(h, kb.i32(hd)), b.add(j, kb.i32(src_off))))),
                           self.act)

        if not self.qk_norm:  # all heads' pairs at once over the lanes
            self._turn(kb, kb.i32(0), heads, raw, cs_row, store)
            return
        with kb.loop(0, heads) as h:  # head by head: its mean and inverse RMS are block reductions
            centre = kb.f32(0.0)
            if self.qk_layer:
                total = kb.var(kb.f32(0.0))
                with kb.lane_loop(hd) as i:
                    total.set(kb.fadd(total.get(), raw(h, i)))
                centre = b.fdiv(kb.reduce(total.get()), kb.f32(hd))
            sq = kb.var(kb.f32(0.0))
            with kb.lane_loop(hd) as i:
                x = b.fsub(raw(h, i), centre)
                sq.set(kb.fadd(sq.get(), kb.fmul(x, x)))
            inv = b.fdiv(kb.f32(1.0), kb.sqrt(b.fadd(b.fdiv(kb.reduce(sq.get()), kb.f32(hd)), kb.f32(self.norm_eps))))

            def normed(hh, j):  # rounded as the reference's head norm output is
                at = b.add(b.mul(hh, kb.i32(hd)), j) if self.qk_layer else j  # per-head weights, or shared
                return round_to(kb, b.fmul(b.fmul(b.fsub(raw(hh, j), centre), inv),
                                           kb.load(kb[norm_w], at, self.norm_weight)), self.act)

            self._turn(kb, h, 1, normed, cs_row, store)

    def _turn(self, kb: KernelBuilder, first: ir.Value, heads: int, value, cs_row: ir.Value, store) -> None:
        """Heads first..first+heads: each rotated pair (j, j + rot_half) stored turned, the
        dims past the rotary ones stored as they are."""
        b, hd, rh = kb.b, self.head_dim, self.rot_half
        with kb.lane_loop(heads * rh) as i:
            h, j = b.add(first, b.sdiv(i, kb.i32(rh))), b.srem(i, kb.i32(rh))
            # the pair's two dims: (j, j + rot_half), or interleaved (2j, 2j + 1)
            d1 = b.mul(j, kb.i32(2)) if self.interleaved else j
            d2 = b.add(d1, kb.i32(1 if self.interleaved else rh))
            x1, x2 = value(h, d1), value(h, d2)
            c = kb.load(kb["cos_sin"], b.add(cs_row, kb.wide(j)), DType.F32)
            s = kb.load(kb["cos_sin"], b.add(cs_row, kb.wide(b.add(j, kb.i32(rh)))), DType.F32)
            head = b.mul(h, kb.i32(hd))
            store(b.add(head, d1), b.fsub(b.fmul(x1, c), b.fmul(x2, s)))
            store(b.add(head, d2), b.fadd(b.fmul(x2, c), b.fmul(x1, s)))
        passed = hd - 2 * rh
        if passed:
            with kb.lane_loop(heads * passed) as i:
                h, j = b.add(first, b.sdiv(i, kb.i32(passed))), b.add(b.srem(i, kb.i32(passed)), kb.i32(2 * rh))
                store(b.add(b.mul(h, kb.i32(hd)), j), value(h, j))

    def body(self, kb: KernelBuilder) -> None:
        b = kb.b
        t = kb.block_id(0)
        q_row = row_offset(kb, t, self.n_heads * self.head_dim)
        self._rotate(kb, self.n_heads, self.q_offset,
                     lambda col, v: kb.store(kb["q_out"], b.add(q_row, kb.wide(col)), v, self.act), "q_norm_w")
        slot = kb.load(kb["slots"], t, DType.I32)
        kv_width = self.n_kv_heads * self.head_dim
        with kb.when(b.icmp_signed(">=", slot, kb.i32(0))):
            dst = row_offset(kb, slot, kv_width)
            self._rotate(kb, self.n_kv_heads, self.k_offset,
                         lambda col, v: kb.store(kb["k_cache"], b.add(dst, kb.wide(col)), v, self.kv), "k_norm_w")
            src = row_offset(kb, t, self.qkv_cols)
            with kb.lane_loop(kv_width) as i:
                v = kb.load(kb["qkv"], b.add(src, kb.wide(b.add(i, kb.i32(self.v_offset)))), self.act)
                kb.store(kb["v_cache"], b.add(dst, kb.wide(i)), v, self.kv)


def cos_sin_table(inv_freq, max_positions: int, scale: float = 1.0):
    """float32 [max_positions, rotary_dim]: cos(p * f) | sin(p * f), times `scale`, as
    ops.rope computes them."""
    import numpy as np

    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * np.asarray(inv_freq, np.float32)[None, :]
    return np.concatenate([np.cos(freqs) * np.float32(scale), np.sin(freqs) * np.float32(scale)],
                          axis=1).astype(np.float32)


__all__ = ["RopeKVWrite", "cos_sin_table", "round_to"]
