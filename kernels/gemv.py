"""GEMV with fused prologues and epilogue: the decode-time workhorse.

    out[r, n] = bias[n] + sum_k x_r[k] * W[n, k]      (W stored output-major)

with x_r produced in-kernel from row r (or rows[r] with `gather`) by the prologue:
    none          x = X[r]
    rms_norm      x = rms_norm(X[r]) * norm_w
    add_rms_norm  s = A[r] + B[r]; x = rms_norm(s) * norm_w   (s written out if asked)
    silu_mul      x = silu(GU[r, :K]) * GU[r, K:]
Each block computes `rows_per_block` outputs of one row and recomputes the prologue
itself, so nothing reads a row that other blocks produce (the legality rule). Lanes
read `vec` consecutive elements per step (16-byte vector loads when K divides). A host
block writes its prologue once into a private row and takes its outputs 8 at a time,
so host blocks are large (64 rows) and the prologue is paid once per 64 outputs.
Intermediates are rounded to the activation dtype where the unfused graph stores them.

With `weight_format` (a GGUF block format, kernels/quant.py) W is read in its stored
blocks and decoded in registers; lanes then stride over groups of 32 weights, and
`weight` is the dtype of the norm weight and bias only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from fusec.fusion.codegen.builder import KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.kernels.base import Kernel, cdiv, round_to, row_offset, silu
from fusec.kernels.quant import FORMATS, GROUP, group_term, hsum, pack, zero_vector

PROLOGUES = ("none", "rms_norm", "add_rms_norm", "silu_mul")
HOST_CHUNK = 8


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
    vec: int = 1  # elements per lane per step: 16-byte loads when K allows (`vector_width`)
    weight_format: str | None = None  # a block format of kernels/quant.py; None: dense `weight`

    def __post_init__(self) -> None:
        if self.weight_format is not None:
            FORMATS[self.weight_format].row_bytes(self.k)  # whole blocks per row, or ValueError
            if GROUP % self.vec:
                raise ValueError(f"vec {self.vec} does not divide a group of {GROUP}")

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
        b, k_dim, vec = kb.b, self.k, self.vec
        out_row = kb.block_id(0)
        src = kb.load(kb["rows"], out_row, DType.I32) if self.gather else out_row
        width = 2 * k_dim if self.prologue == "silu_mul" else k_dim
        base = row_offset(kb, src, width)

        def at(i):
            return b.add(base, kb.wide(i))

        def loads(name: str, i, dtype: DType, offset: int = 0) -> list:
            """vec consecutive elements from i (+ offset) of a row of `name`."""
            index = b.add(at(i), kb.i64(offset))
            return kb.load_vector(kb[name], index, dtype, vec) if vec > 1 else [kb.load(kb[name], index, dtype)]

        def raw(i) -> list:
            if self.prologue == "add_rms_norm":
                return [round_to(kb, kb.fadd(a, c), self.act)
                        for a, c in zip(loads("a", i, self.act), loads("b", i, self.act))]
            return loads("x", i, self.act)

        def vec_loop(stop: int):
            """for i in range(lane * vec, stop, lanes * vec): vec elements per lane a step."""
            if vec == 1:
                return kb.lane_loop(stop)
            return kb.loop(b.mul(kb.lane(), kb.i32(vec)), stop, b.mul(kb.lanes(), kb.i32(vec)))

        inv_rms = None
        if self.prologue in ("rms_norm", "add_rms_norm"):
            sq = kb.var(kb.f32(0.0))
            with vec_loop(k_dim) as i:
                total = sq.get()
                for v in raw(i):
                    total = kb.fadd(total, kb.fmul(v, v))
                sq.set(total)
            mean = b.fdiv(kb.reduce(sq.get()), kb.f32(k_dim))
            inv_rms = b.fdiv(kb.f32(1.0), kb.sqrt(b.fadd(mean, kb.f32(self.eps))))
        if self.residual_out:
            with kb.when(b.icmp_unsigned("==", kb.block_id(1), kb.i32(0))):
                with vec_loop(k_dim) as i:
                    for j, v in enumerate(raw(i)):
                        kb.store(kb["residual"], b.add(at(i), kb.i64(j)), v, self.act)

        def x_at(i) -> list:
            if self.prologue == "none":
                return raw(i)
            if self.prologue == "silu_mul":
                return [round_to(kb, b.fmul(silu(kb, g), u), self.act)
                        for g, u in zip(loads("gu", i, self.act), loads("gu", i, self.act, k_dim))]
            norm_w = (kb.load_vector(kb["norm_w"], i, self.weight, vec) if vec > 1
                      else [kb.load(kb["norm_w"], i, self.weight)])
            return [round_to(kb, b.fmul(b.fmul(v, inv_rms), w), self.act) for v, w in zip(raw(i), norm_w)]

        if not kb.target.is_gpu:  # the prologue once per block into a private row, outputs a chunk at a time
            xbuf = kb.local(DType.F32, k_dim)
            with vec_loop(k_dim) as i:
                for j, v in enumerate(x_at(i)):
                    kb.store(xbuf, b.add(i, kb.i32(j)), v, DType.F32)

            def x_at(i) -> list:  # noqa: F811 (the buffered prologue)
                return (kb.load_vector(xbuf, i, DType.F32, vec) if vec > 1 else [kb.load(xbuf, i, DType.F32)])
        rpb, chunk = self.rows_per_block, self.rows_per_chunk(kb.target.is_gpu)
        n0 = b.mul(kb.block_id(1), kb.i32(rpb))
        if chunk == rpb:
            self._rows(kb, out_row, n0, chunk, x_at, vec_loop)
        else:
            with kb.loop(0, kb.imin(kb.i32(rpb), b.sub(kb.i32(self.n), n0)), chunk) as c:
                self._rows(kb, out_row, b.add(n0, c), chunk, x_at, vec_loop)

    def rows_per_chunk(self, gpu: bool) -> int:
        """Outputs computed together (one accumulator each): all of a block's on a GPU,
        8 at a time on the host, whose blocks are larger (the prologue runs once a block)."""
        return self.rows_per_block if gpu or self.rows_per_block % HOST_CHUNK else HOST_CHUNK

    def _rows(self, kb: KernelBuilder, out_row, n0, chunk: int, x_at, vec_loop) -> None:
        """Outputs n0 .. n0 + chunk - 1 of row out_row."""
        b = kb.b
        last = kb.i32(self.n - 1)
        # rows past the end read the last row (kept in bounds) and are not stored
        rows = [kb.imin(b.add(n0, kb.i32(j)), last) for j in range(chunk)]
        if self.weight_format is not None:
            totals = self._block_dots(kb, rows, x_at)
        else:
            accs = [kb.var(kb.f32(0.0)) for _ in range(chunk)]
            self._dense_dot(kb, [row_offset(kb, r, self.k) for r in rows], accs, vec_loop, x_at)
            totals = [acc.get() for acc in accs]
        self._store(kb, out_row, n0, totals)

    def _block_dots(self, kb: KernelBuilder, rows: list, x_at) -> list:
        """Each row's dot with x over its quantized groups of 32, as this lane's partial
        sum: 16-wide accumulators, one horizontal sum at the end."""
        b, fmt = kb.b, FORMATS[self.weight_format]
        w_rows = [row_offset(kb, r, fmt.row_bytes(self.k)) for r in rows]
        accs = [kb.var(zero_vector()) for _ in rows]
        with kb.lane_loop(self.k // GROUP) as g:
            i0 = b.mul(g, kb.i32(GROUP))
            xs = [x for c in range(0, GROUP, self.vec) for x in x_at(b.add(i0, kb.i32(c)))]
            x_lo, x_hi = pack(kb, xs[:16]), pack(kb, xs[16:])
            x_sum = kb.fadd(x_lo, x_hi) if fmt.has_min else None
            for acc, w_row in zip(accs, w_rows):
                acc.set(kb.fadd(acc.get(), group_term(kb, fmt, kb["w"], w_row, g, x_lo, x_hi, x_sum)))
        return [hsum(kb, acc.get()) for acc in accs]

    def _dense_dot(self, kb: KernelBuilder, w_rows: list, accs: list, vec_loop, x_at) -> None:
        b, vec = kb.b, self.vec
        with vec_loop(self.k) as i:
            xs = x_at(i)
            for acc, w_row in zip(accs, w_rows):
                w_at = b.add(w_row, kb.wide(i))
                ws = kb.load_vector(kb["w"], w_at, self.weight, vec) if vec > 1 else [kb.load(kb["w"], w_at, self.weight)]
                total = acc.get()
                for x, w in zip(xs, ws):
                    total = kb.fadd(total, kb.fmul(x, w))
                acc.set(total)

    def _store(self, kb: KernelBuilder, out_row, n0, partials: list) -> None:
        b = kb.b
        totals = [kb.reduce(p) for p in partials]
        out_base = row_offset(kb, out_row, self.n)
        with kb.when(b.icmp_unsigned("==", kb.lane(), kb.i32(0))):
            for j, total in enumerate(totals):
                n = b.add(n0, kb.i32(j))
                with kb.when(b.icmp_signed("<", n, kb.i32(self.n))):
                    y = round_to(kb, total, self.out)
                    if self.bias:
                        y = b.fadd(y, kb.load(kb["bias"], n, self.weight))
                    kb.store(kb["y"], b.add(out_base, kb.wide(n)), y, self.out)


def vector_width(k: int, *dtypes: DType) -> int:
    """Elements per 16-byte load of the widest dtype, if k rows split into whole vectors."""
    vec = 16 // max(d.itemsize for d in dtypes)
    return vec if k % vec == 0 else 1
