"""Paged causal GQA attention over the KV cache, for decode and prefill alike.

One block per (token, query head). The block walks its sequence's keys in tiles of
`lanes` keys: each lane scores one key, the block keeps an online-softmax running
max and sum, then lanes switch to head dimensions to accumulate p * V. On the host
(one lane) a tile is one key. Sliding windows clip the first key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from fusec.fusion.codegen.builder import KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.kernels.base import GPU_LANES, Kernel, round_to, row_offset


@dataclass(frozen=True)
class PagedAttention(Kernel):
    family = "paged_attention"
    n_heads: int
    n_kv_heads: int
    head_dim: int
    block_size: int
    scale: float
    sliding_window: int  # 0 = none
    act: DType

    def params(self) -> list[Param]:
        return [Param(n, "ptr") for n in ("q", "k_cache", "v_cache", "block_tables", "context_lens",
                                           "query_start_loc", "out")] \
            + [Param("num_seqs", "i32"), Param("table_width", "i32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return dims["num_tokens"], self.n_heads  # tokens on x: no 65535 limit on prefill length

    def body(self, kb: KernelBuilder) -> None:
        b, hd, bs = kb.b, self.head_dim, self.block_size
        tile = GPU_LANES if kb.target.is_gpu else 1
        t, h = kb.block_id(0), kb.block_id(1)
        lane = kb.lane()
        # which sequence owns token t
        seq = kb.var(kb.i32(0))
        with kb.loop(0, kb["num_seqs"]) as s:
            start = kb.load(kb["query_start_loc"], s, DType.I32)
            with kb.when(b.icmp_signed("<=", start, t)):
                seq.set(s)
        s = seq.get()
        first = kb.load(kb["query_start_loc"], s, DType.I32)
        n_new = b.sub(kb.load(kb["query_start_loc"], b.add(s, kb.i32(1)), DType.I32), first)
        ctx = kb.load(kb["context_lens"], s, DType.I32)
        pos = b.add(b.sub(ctx, n_new), b.sub(t, first))
        hi = b.add(pos, kb.i32(1))
        lo = kb.imax(b.sub(hi, kb.i32(self.sliding_window)), kb.i32(0)) if self.sliding_window else kb.i32(0)
        kv_head = b.sdiv(h, kb.i32(self.n_heads // self.n_kv_heads))
        table = b.mul(kb.wide(s), kb.wide(kb["table_width"]))

        def kv_base(j):  # element offset of key j's head vector in a cache half
            blk = kb.load(kb["block_tables"], b.add(table, kb.wide(b.sdiv(j, kb.i32(bs)))), DType.I32)
            slot = b.add(b.mul(kb.wide(blk), kb.i64(bs)), kb.wide(b.srem(j, kb.i32(bs))))
            return b.add(b.mul(slot, kb.i64(self.n_kv_heads * hd)), b.mul(kb.wide(kv_head), kb.i64(hd)))

        q_sh, acc_sh, p_sh = kb.shared(hd, "q"), kb.shared(hd, "acc"), kb.shared(tile, "p")
        q_row = b.add(row_offset(kb, t, self.n_heads * hd), b.mul(kb.wide(h), kb.i64(hd)))
        with kb.lane_loop(hd) as d:
            q = kb.load(kb["q"], b.add(q_row, kb.wide(d)), self.act)
            kb.store(q_sh, d, b.fmul(q, kb.f32(self.scale)), DType.F32)
            kb.store(acc_sh, d, kb.f32(0.0), DType.F32)
        kb.barrier()
        m, l_sum = kb.var(kb.f32(-math.inf)), kb.var(kb.f32(0.0))
        with kb.loop(lo, hi, tile) as j0:
            j = b.add(j0, lane)
            valid = b.icmp_signed("<", j, hi)
            score = kb.var(kb.f32(-math.inf))
            with kb.when(valid):
                base = kv_base(j)
                dot = kb.var(kb.f32(0.0))
                with kb.loop(0, hd) as d:
                    k = kb.load(kb["k_cache"], b.add(base, kb.wide(d)), self.act)
                    dot.set(kb.fadd(dot.get(), kb.fmul(kb.load(q_sh, d, DType.F32), k)))
                score.set(dot.get())
            m_new = kb.fmax(m.get(), kb.reduce(score.get(), "max"))
            p = b.select(valid, kb.exp(b.fsub(score.get(), m_new)), kb.f32(0.0))
            alpha = kb.exp(b.fsub(m.get(), m_new))
            l_sum.set(b.fadd(b.fmul(l_sum.get(), alpha), kb.reduce(p)))
            kb.barrier()
            kb.store(p_sh, lane, p, DType.F32)
            kb.barrier()
            count = kb.imin(b.sub(hi, j0), kb.i32(tile))
            with kb.lane_loop(hd) as d:
                a = kb.var(b.fmul(kb.load(acc_sh, d, DType.F32), alpha))
                with kb.loop(0, count) as jj:
                    v = kb.load(kb["v_cache"], b.add(kv_base(b.add(j0, jj)), kb.wide(d)), self.act)
                    a.set(kb.fadd(a.get(), kb.fmul(kb.load(p_sh, jj, DType.F32), v)))
                kb.store(acc_sh, d, a.get(), DType.F32)
            m.set(m_new)
        inv = b.fdiv(kb.f32(1.0), l_sum.get())
        with kb.lane_loop(hd) as d:
            kb.store(kb["out"], b.add(q_row, kb.wide(d)),
                     round_to(kb, b.fmul(kb.load(acc_sh, d, DType.F32), inv), self.act), self.act)
