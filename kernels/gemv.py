"""GEMV with fused prologues and epilogue: the decode-time workhorse.

    out[r, n] = bias[n] + sum_k x_r[k] * W[n, k]      (W stored output-major)

with x_r produced in-kernel from row r (or rows[r] with `gather`) by the prologue:
    none          x = X[r]
    rms_norm      x = rms_norm(X[r]) * norm_w
    add_rms_norm  s = A[r] + B[r]; x = rms_norm(s) * norm_w   (s written out if asked)
    silu_mul      x = silu(GU[r, :K]) * GU[r, K:]
Each block computes `rows_per_block` outputs of one row and recomputes the prologue
itself, so nothing reads a row that other blocks produce (the legality rule).
Intermediates are rounded to the activation dtype where the unfused graph stores them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from fusec.fusion.codegen.builder import KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.kernels.base import Kernel, cdiv, round_to, row_offset, silu

PROLOGUES = ("none", "rms_norm", "add_rms_norm", "silu_mul")


@dataclass(frozen=True)
class Gemv(Kernel):
    family = "gemv"
    k: int
    n: int
    act: DType  # dtype of the prologue's inputs and intermediates
    weight: DType
    out: DType
    prologue: str = "none"
    bias: bool = False
    gather: bool = False
    residual_out: bool = False
    eps: float = 0.0
    rows_per_block: int = 4

    def params(self) -> list[Param]:
        p = {"none": ["x"], "rms_norm": ["x", "norm_w"], "add_rms_norm": ["a", "b", "norm_w"],
             "silu_mul": ["gu"]}[self.prologue]
        if self.residual_out:
            p.append("residual")
        p.append("w")
        if self.bias:
            p.append("bias")
        if self.gather:
            p.append("rows")
        p.append("y")
        return [Param(n, "ptr") for n in p] + [Param("num_rows", "i32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        # rows on x (up to 2**31 - 1 blocks), output blocks on y (65535: N <= 262140 at 4 per block)
        return dims["num_rows"], cdiv(self.n, self.rows_per_block)

    def body(self, kb: KernelBuilder) -> None:
        b, k_dim = kb.b, self.k
        out_row = kb.block_id(0)
        src = kb.load(kb["rows"], out_row, DType.I32) if self.gather else out_row
        width = 2 * k_dim if self.prologue == "silu_mul" else k_dim
        base = row_offset(kb, src, width)

        def at(i):
            return b.add(base, kb.wide(i))

        def summed(i):
            s = kb.fadd(kb.load(kb["a"], at(i), self.act), kb.load(kb["b"], at(i), self.act))
            return round_to(kb, s, self.act)

        raw = {"none": lambda i: kb.load(kb["x"], at(i), self.act),
               "rms_norm": lambda i: kb.load(kb["x"], at(i), self.act),
               "add_rms_norm": summed}.get(self.prologue)
        inv_rms = None
        if self.prologue in ("rms_norm", "add_rms_norm"):
            sq = kb.var(kb.f32(0.0))
            with kb.lane_loop(k_dim) as i:
                v = raw(i)
                sq.set(kb.fadd(sq.get(), kb.fmul(v, v)))
            mean = b.fdiv(kb.reduce(sq.get()), kb.f32(k_dim))
            inv_rms = b.fdiv(kb.f32(1.0), kb.sqrt(b.fadd(mean, kb.f32(self.eps))))
        if self.residual_out:
            with kb.when(b.icmp_unsigned("==", kb.block_id(1), kb.i32(0))):
                with kb.lane_loop(k_dim) as i:
                    kb.store(kb["residual"], at(i), raw(i), self.act)

        def x_at(i):
            if self.prologue == "none":
                return raw(i)
            if self.prologue == "silu_mul":
                g = kb.load(kb["gu"], at(i), self.act)
                u = kb.load(kb["gu"], b.add(at(i), kb.i64(k_dim)), self.act)
                return round_to(kb, b.fmul(silu(kb, g), u), self.act)
            normed = b.fmul(b.fmul(raw(i), inv_rms), kb.load(kb["norm_w"], i, self.weight))
            return round_to(kb, normed, self.act)

        rpb = self.rows_per_block
        n0 = b.mul(kb.block_id(1), kb.i32(rpb))
        last = kb.i32(self.n - 1)
        # rows past the end read the last row (kept in bounds) and are not stored
        w_rows = [row_offset(kb, kb.imin(b.add(n0, kb.i32(j)), last), k_dim) for j in range(rpb)]
        accs = [kb.var(kb.f32(0.0)) for _ in range(rpb)]
        with kb.lane_loop(k_dim) as i:
            x = x_at(i)
            for acc, w_row in zip(accs, w_rows):
                w = kb.load(kb["w"], b.add(w_row, kb.wide(i)), self.weight)
                acc.set(kb.fadd(acc.get(), kb.fmul(x, w)))
        totals = [kb.reduce(acc.get()) for acc in accs]
        out_base = row_offset(kb, out_row, self.n)
        with kb.when(b.icmp_unsigned("==", kb.lane(), kb.i32(0))):
            for j, total in enumerate(totals):
                n = b.add(n0, kb.i32(j))
                with kb.when(b.icmp_signed("<", n, kb.i32(self.n))):
                    y = round_to(kb, total, self.out)
                    if self.bias:
                        y = b.fadd(y, kb.load(kb["bias"], n, self.weight))
                    kb.store(kb["y"], b.add(out_base, kb.wide(n)), y, self.out)
