"""RoPE on q and k, then k and v written into the paged cache: one block per token.

Reads q|k|v from the fused QKV output by column offset (the slices fold in here);
cos/sin come from a float32 table [max_position, head_dim] (cos | sin halves) built
once from the graph's inverse frequencies, the same numbers the reference computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

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

    def params(self) -> list[Param]:
        return [Param(n, "ptr") for n in ("qkv", "positions", "cos_sin", "slots", "k_cache", "v_cache", "q_out")] \
            + [Param("num_tokens", "i32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return dims["num_tokens"], 1

    def _rotate(self, kb: KernelBuilder, heads: int, src_off: int, store) -> None:
        b, hd, half = kb.b, self.head_dim, self.head_dim // 2
        t = kb.block_id(0)
        row = row_offset(kb, t, self.qkv_cols)
        pos = kb.load(kb["positions"], t, DType.I32)
        cs_row = row_offset(kb, pos, hd)
        with kb.lane_loop(heads * half) as i:
            h, j = b.sdiv(i, kb.i32(half)), b.srem(i, kb.i32(half))
            col = b.add(b.mul(h, kb.i32(hd)), j)
            x1 = kb.load(kb["qkv"], b.add(row, kb.wide(b.add(col, kb.i32(src_off)))), self.act)
            x2 = kb.load(kb["qkv"], b.add(row, kb.wide(b.add(col, kb.i32(src_off + half)))), self.act)
            c = kb.load(kb["cos_sin"], b.add(cs_row, kb.wide(j)), DType.F32)
            s = kb.load(kb["cos_sin"], b.add(cs_row, kb.wide(b.add(j, kb.i32(half)))), DType.F32)
            store(col, b.fsub(b.fmul(x1, c), b.fmul(x2, s)))
            store(b.add(col, kb.i32(half)), b.fadd(b.fmul(x2, c), b.fmul(x1, s)))

    def body(self, kb: KernelBuilder) -> None:
        b = kb.b
        t = kb.block_id(0)
        q_row = row_offset(kb, t, self.n_heads * self.head_dim)
        self._rotate(kb, self.n_heads, self.q_offset,
                     lambda col, v: kb.store(kb["q_out"], b.add(q_row, kb.wide(col)), v, self.act))
        slot = kb.load(kb["slots"], t, DType.I32)
        kv_width = self.n_kv_heads * self.head_dim
        with kb.when(b.icmp_signed(">=", slot, kb.i32(0))):
            dst = row_offset(kb, slot, kv_width)
            self._rotate(kb, self.n_kv_heads, self.k_offset,
                         lambda col, v: kb.store(kb["k_cache"], b.add(dst, kb.wide(col)), v, self.act))
            src = row_offset(kb, t, self.qkv_cols)
            with kb.lane_loop(kv_width) as i:
                v = kb.load(kb["qkv"], b.add(src, kb.wide(b.add(i, kb.i32(self.v_offset)))), self.act)
                kb.store(kb["v_cache"], b.add(dst, kb.wide(i)), v, self.act)


def cos_sin_table(inv_freq, max_positions: int):
    """float32 [max_positions, head_dim]: cos(p * f) | sin(p * f), as ops.rope computes them."""
    import numpy as np

    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * np.asarray(inv_freq, np.float32)[None, :]
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=1).astype(np.float32)


__all__ = ["RopeKVWrite", "cos_sin_table", "round_to"]
