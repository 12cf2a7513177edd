"""GEMV with fused prologues and epilogue: the decode-time workhorse.

    out[r, n] = bias[n] + sum_k x_r[k] * W[n, k]      (W stored output-major)

with x_r produced in-kernel from row r (or rows[r] with `gather`) by the prologue:
    none          x = X[r]
    rms_norm      x = rms_norm(X[r]) * norm_w
    add_rms_norm  s = A[r] + B[r]; x = rms_norm(s) * norm_w   (s written out if asked)
    layer_norm    x = layer_norm(X[r]) * norm_w + norm_b       (StableLM)
    add_layer_norm  s = A[r] + B[r]; x = layer_norm(s) * norm_w + norm_b
    rms_norm_add_rms_norm
                  s = A[r] + rms_norm(B[r]) * post_w; x = rms_norm(s) * norm_w
                  (Gemma 2's sandwich norms: a block's output norm, the residual add and
                  the next block's input norm, s written out if asked)
    silu_mul      x = silu(GU[r, :K]) * GU[r, K:]
    gelu_tanh_mul x = gelu_tanh(GU[r, :K]) * GU[r, K:]     (Gemma's GeGLU)
    gelu          x = gelu(X[r])                            (GPT-NeoX's non-gated MLP)
Each block computes `rows_per_block` outputs and recomputes the prologue itself, so
nothing reads a row that other blocks produce (the legality rule). Intermediates are
rounded to the activation dtype where the unfused graph stores them.

GPU: a block takes one token row; lanes read `vec` consecutive elements per step
(16-byte vector loads when K divides). With `weight_format` (a GGUF block format,
kernels/quant.py) W is read in its stored blocks and decoded in registers, lanes
striding over groups of 32 weights; `weight` is then the dtype of the norm weight and
bias only.

Host: a block takes a tile of `tokens_per_block` token rows (the last one may be
short: the code is specialised for heights 1, 2, 4, 8) and walks its outputs a few
weight rows at a time with rows x tokens 16-wide accumulators: each weight (group) is
loaded and decoded once for the whole tile, so a batch of T tokens costs far less than
T GEMVs. Blocks run tile-major and a CPU thread runs a contiguous range of them, so it
writes a tile's prologue rows once into launch-scoped memory (`launch_local`) and
reuses them for every block of that tile it runs; blocks can then be small (16 rows)
for an even split over threads. Each row's weights are prefetched a few KiB ahead: the
hardware prefetcher follows a tile's 8 interleaved row streams poorly.

Host `int8_dots` (q8_0 / q4_0 / q4_1 weights, CPUs with AVX-512 VNNI): the tile's
prologue rows are also quantized per group of 32 into two int8 vectors (llama.cpp's q8_0
activations and their rounding error: kernels/quant.py), dotted with the weights' bytes
by VNNI instructions instead of decoding the weights to floats. Weights in a banded form
(q4_1x16 ..: 16 rows' groups stored together, the rows in the lanes) take a band of 16
rows at a time for any tile height: one vpdpbusd takes 4 bytes of a token against the 16
rows, and a group's scales multiply the 16 at once; a band is one sequential stream. A
matrix in its GGUF form (rows not in whole bands) takes one-token tiles a row at a time,
two vpdpbusd a group, and taller tiles in floats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from llvmlite import ir

from fusec.fusion.codegen.builder import KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.kernels.base import GATES, Kernel, cdiv, gelu, round_to, row_offset
from fusec.kernels.quant import (BAND, BAND_F32, BAND_I32, F32X8, FINE, FORMATS, GROUP, HALF, I8, I8X32, I32,
                                 INT8_CHAINS, INT8_DOT_FORMATS, band_group, band_group_at, band_start,
                                 byte_dot, group_bytes, group_term, group_values, hsum, pack, quantize_activations,
                                 sliced_dots, splat, zero_vector)

LAYER_NORMED = ("layer_norm", "add_layer_norm")  # prologues ending in a LayerNorm (with bias)
NORMED = ("rms_norm", "add_rms_norm", "rms_norm_add_rms_norm", *LAYER_NORMED)  # ... or in any norm
PROLOGUES = ("none", *NORMED, *GATES, "gelu")
HOST_CHUNK = 8  # most weight rows a host tile works on together
HOST_ACCUMULATORS = 16  # 16-wide accumulators a host tile keeps (of 32 AVX-512 registers)
# How far ahead of each weight row a host tile asks for cache lines. A tile reads up to 8
# rows at once, each a separate stream the hardware prefetcher follows poorly: on a
# 2-core EPYC (Zen 5) a prefetch 2 KiB ahead took the q8_0 LM head from 8.5 to 11.7 GB/s
# on one thread and a SmolLM2 Q4_1 decode step from 4.96 to 3.51 ms (1 KiB and 4 KiB
# within noise of 2 KiB, 512 B and 8 KiB worse). Rows read a cache line a step (f32) are
# left to the hardware: prefetching them cost 5-10%; f16 rows gained 1.6x at 8 tokens.
# Block-format rows shorter than that are prefetched two chunks of rows ahead instead (the
# same place in the row 2 x rows-a-chunk further on): 2 KiB past a 1088-byte q8_0 row is
# a row the chunk reads anyway. On a Qwen3-MoE-shaped q8_0 model (K = 1024) that took the
# LM head from 6.5-7.2 to 4.3-5.3 ms on one thread and the decode step from 16-20 to
# 12.6-15.7 ms on two; SmolLM2's Q4_1 step from 7.6-8.6 to 6.6 ms (bench/kernel_profile.py,
# best of 5 batches, 2026-12-04, a noisier machine than the figures above).
HOST_PREFETCH_BYTES = 2048
# A banded matrix is one sequential stream a thread; prefetching 1 KiB ahead of it still
# helped SmolLM2's Q4_1 decode step (one thread 3.4-3.8 vs 3.5-4.4 ms, four alternated
# pairs; 2 and 4 KiB within noise of it; bench/kernel_profile.py, 2026-12-05).
BAND_PREFETCH_BYTES = 1024
CACHE_LINE = 64


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
    tokens_per_block: int = 1  # host: token rows a block takes together (GPU: 1)
    int8_dots: bool = False  # host: int8 activations dotted with the weights' bytes (VNNI)

    def __post_init__(self) -> None:
        if self.int8_dots and not (self.weight_format in INT8_DOT_FORMATS or self.banded):
            raise ValueError(f"int8 dots read {', '.join(INT8_DOT_FORMATS)} weights or their banded forms, "
                             f"not {self.weight_format}")
        if self.banded and not (self.int8_dots and self.n % BAND == 0 and self.rows_per_block % BAND == 0):
            raise ValueError(f"{self.weight_format} weights are read by host int8 dots, {BAND} rows a band "
                             f"(N = {self.n}, {self.rows_per_block} rows a block)")
        if self.weight_format is not None:
            FORMATS[self.weight_format].row_bytes(self.k)  # whole blocks per row, or ValueError
            if GROUP % self.vec:
                raise ValueError(f"vec {self.vec} does not divide a group of {GROUP}")

    @property
    def banded(self) -> bool:
        """Whether W is in a banded form (kernels/quant.py)."""
        return self.weight_format is not None and FORMATS[self.weight_format].banded

    def params(self) -> list[Param]:
        p = ["gu"] if self.prologue in GATES else \
            {"none": ["x"], "gelu": ["x"], "rms_norm": ["x", "norm_w"], "add_rms_norm": ["a", "b", "norm_w"],
             "rms_norm_add_rms_norm": ["a", "b", "post_w", "norm_w"], "layer_norm": ["x", "norm_w", "norm_b"],
             "add_layer_norm": ["a", "b", "norm_w", "norm_b"]}[self.prologue]
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
        return cdiv(dims["num_rows"], self.tokens_per_block), cdiv(self.n, self.rows_per_block)

    def body(self, kb: KernelBuilder) -> None:
        if not kb.target.is_gpu:
            self._host_body(kb)
            return
        if self.tokens_per_block != 1 or self.int8_dots:
            raise ValueError("GPU GEMVs take one token row a block, in float")
        b = kb.b
        out_row = kb.block_id(0)
        n0 = b.mul(kb.block_id(1), kb.i32(self.rows_per_block))
        x_at = self._prologue(kb, out_row, b.icmp_unsigned("==", kb.block_id(1), kb.i32(0)))
        last = kb.i32(self.n - 1)
        # rows past the end read the last row (kept in bounds) and are not stored
        rows = [kb.imin(b.add(n0, kb.i32(j)), last) for j in range(self.rows_per_block)]
        totals = self._row_dots(kb, rows, x_at)
        with kb.when(b.icmp_unsigned("==", kb.lane(), kb.i32(0))):
            self._store(kb, out_row, [b.add(n0, kb.i32(j)) for j in range(len(rows))], totals)

    def _vec_loop(self, kb: KernelBuilder, stop: int):
        """for i in range(lane * vec, stop, lanes * vec): vec elements per lane a step."""
        if self.vec == 1:
            return kb.lane_loop(stop)
        b = kb.b
        return kb.loop(b.mul(kb.lane(), kb.i32(self.vec)), stop, b.mul(kb.lanes(), kb.i32(self.vec)))

    def _prologue(self, kb: KernelBuilder, out_row, first_block):
        """x_at(i): the prologue's vec elements from i of token row out_row (the residual
        sum stored on the way where first_block, the row's first output block, holds)."""
        b, k_dim, vec = kb.b, self.k, self.vec
        src = kb.load(kb["rows"], out_row, DType.I32) if self.gather else out_row
        width = 2 * k_dim if self.prologue in GATES else k_dim
        base = row_offset(kb, src, width)

        def at(i):
            return b.add(base, kb.wide(i))

        def loads(name: str, i, dtype: DType, offset: int = 0) -> list:
            """vec consecutive elements from i (+ offset) of a row of `name`."""
            index = b.add(at(i), kb.i64(offset))
            return kb.load_vector(kb[name], index, dtype, vec) if vec > 1 else [kb.load(kb[name], index, dtype)]

        def row_mean(values) -> ir.Value:
            acc = kb.var(kb.f32(0.0))
            with self._vec_loop(kb, k_dim) as i:
                total = acc.get()
                for v in values(i):
                    total = kb.fadd(total, v)
                acc.set(total)
            return b.fdiv(kb.reduce(acc.get()), kb.f32(k_dim))

        def inverse_rms(values) -> ir.Value:  # of values (minus the mean, for a LayerNorm)
            mean = row_mean(lambda i: [kb.fmul(v, v) for v in values(i)])
            return b.fdiv(kb.f32(1.0), kb.sqrt(b.fadd(mean, kb.f32(self.eps))))

        def weights(name: str, i) -> list:
            return kb.load_vector(kb[name], i, self.weight, vec) if vec > 1 else [kb.load(kb[name], i, self.weight)]

        inv_post = inverse_rms(lambda i: loads("b", i, self.act)) if self.prologue == "rms_norm_add_rms_norm" \
            else None

        def raw(i) -> list:
            if self.prologue in ("add_rms_norm", "add_layer_norm"):
                return [round_to(kb, kb.fadd(a, c), self.act)
                        for a, c in zip(loads("a", i, self.act), loads("b", i, self.act))]
            if self.prologue == "rms_norm_add_rms_norm":
                normed = [round_to(kb, b.fmul(b.fmul(v, inv_post), w), self.act)
                          for v, w in zip(loads("b", i, self.act), weights("post_w", i))]
                return [round_to(kb, kb.fadd(a, n), self.act) for a, n in zip(loads("a", i, self.act), normed)]
            return loads("x", i, self.act)

        centre = row_mean(raw) if self.prologue in LAYER_NORMED else None

        def centred(i) -> list:
            return raw(i) if centre is None else [b.fsub(v, centre) for v in raw(i)]

        inv_rms = inverse_rms(centred) if self.prologue in NORMED else None
        if self.residual_out:
            with kb.when(first_block):
                with self._vec_loop(kb, k_dim) as i:
                    for j, v in enumerate(raw(i)):
                        kb.store(kb["residual"], b.add(at(i), kb.i64(j)), v, self.act)

        def x_at(i) -> list:
            if self.prologue == "none":
                return raw(i)
            if self.prologue == "gelu":
                return [round_to(kb, gelu(kb, v), self.act) for v in raw(i)]
            if self.prologue in GATES:
                return [round_to(kb, b.fmul(GATES[self.prologue](kb, g), u), self.act)
                        for g, u in zip(loads("gu", i, self.act), loads("gu", i, self.act, k_dim))]
            if self.prologue in LAYER_NORMED:
                return [round_to(kb, b.fadd(b.fmul(b.fmul(v, inv_rms), w), c), self.act)
                        for v, w, c in zip(centred(i), weights("norm_w", i), weights("norm_b", i))]
            return [round_to(kb, b.fmul(b.fmul(v, inv_rms), w), self.act) for v, w in zip(raw(i), weights("norm_w", i))]
        return x_at

    # -- host: a tile of token rows, each weight read (and decoded) once for all of them --
    def _host_body(self, kb: KernelBuilder) -> None:
        b, tpb = kb.b, self.tokens_per_block
        tile, out_block, t0, count = self._host_block(kb)
        xbuf = kb.launch_local(DType.F32, tpb * self.k)  # the tile's prologue rows
        qbuf, sbuf = self._int8_buffers(kb, tpb)
        held = kb.launch_local(DType.I32, init=kb.i32(-1))  # the tile xbuf holds
        with kb.when(b.icmp_signed("!=", kb.load(held, kb.i32(0), DType.I32), tile)):
            first = b.icmp_unsigned("==", out_block, kb.i32(0))  # the first of its tile: every thread reaches it here
            with kb.loop(0, count) as t:
                x_at = self._prologue(kb, b.add(t0, t), first)
                at = b.mul(t, kb.i32(self.k))
                with self._vec_loop(kb, self.k) as i:
                    for j, v in enumerate(x_at(i)):
                        kb.store(xbuf, b.add(at, b.add(i, kb.i32(j))), v, DType.F32)
                if self.banded:
                    self._quantize_row(kb, xbuf, qbuf, sbuf, t)
                elif self.int8_dots:  # GGUF-form weights take int8 in one-token tiles only
                    with kb.when(b.icmp_signed("==", count, kb.i32(1))):
                        self._quantize_row(kb, xbuf, qbuf, sbuf, t)
            kb.store(held, kb.i32(0), tile, DType.I32)
        n0 = b.mul(out_block, kb.i32(self.rows_per_block))
        low = 0
        for height in tile_heights(tpb):  # code specialised per height: accumulators stay in registers
            fits = b.and_(b.icmp_signed(">", count, kb.i32(low)), b.icmp_signed("<=", count, kb.i32(height)))
            with kb.when(fits):
                # rows past the tile's end repeat its last row and are not stored
                last = b.sub(count, kb.i32(1))
                tokens = [kb.imin(kb.i32(t), last) for t in range(height)]
                stored = [b.icmp_signed("<", kb.i32(t), count) for t in range(height)]
                if self.banded:
                    self._host_band_tile(kb, t0, tokens, stored, qbuf, sbuf, n0)
                elif height == 1 and self.int8_dots:
                    self._host_int8_tile(kb, t0, qbuf, sbuf, n0)
                else:
                    self._host_tile(kb, t0, tokens, stored, xbuf, n0)
            low = height

    def _int8_buffers(self, kb: KernelBuilder, rows: int) -> tuple:
        """With int8_dots, launch-scoped room for `rows` prologue rows quantized: their two
        int8 vectors a group (4 bytes to a word) and each group's (dx / FINE, total); else (None, None)."""
        if not self.int8_dots:
            return None, None
        return kb.launch_local(DType.I32, rows * self.k // 2), kb.launch_local(DType.F32, rows * self.k // GROUP * 2)

    def _quantize_row(self, kb: KernelBuilder, xbuf, qbuf, sbuf, t) -> None:
        """Prologue row t of the tile (in xbuf) quantized per group: qx and qr into qbuf
        (2 K bytes a row), (dx / FINE, total) into sbuf: the dots count in qr's steps."""
        b, groups = kb.b, self.k // GROUP
        with kb.loop(0, groups) as g:
            at = b.add(b.mul(t, kb.i32(self.k)), b.mul(g, kb.i32(GROUP)))
            x = quantize_activations(kb, *(kb.load_packed(xbuf, b.add(at, kb.i32(h)), DType.F32, HALF)
                                           for h in (0, HALF)))
            q_at = b.add(b.mul(t, kb.i32(2 * self.k)), b.mul(g, kb.i32(2 * GROUP)))
            for h, q in enumerate((x.qx, x.qr)):
                b.store(q, b.gep(qbuf, [kb.wide(b.add(q_at, kb.i32(h * GROUP)))], inbounds=True, source_etype=I8),
                        align=1)
            s_at = b.mul(b.add(b.mul(t, kb.i32(groups)), g), kb.i32(2))
            kb.store(sbuf, s_at, kb.fmul(x.dx, kb.f32(1.0 / FINE)), DType.F32)
            kb.store(sbuf, b.add(s_at, kb.i32(1)), x.total, DType.F32)

    def _host_int8_tile(self, kb: KernelBuilder, t0, qbuf, sbuf, n0) -> None:
        """A one-token tile's outputs from its int8 row (row 0 of qbuf / sbuf)."""
        b = kb.b
        chunk = host_rows_per_chunk(1, self.rows_per_block)
        last = kb.i32(self.n - 1)
        with kb.loop(0, kb.imin(kb.i32(self.rows_per_block), b.sub(kb.i32(self.n), n0)), chunk) as c:
            ns = [b.add(b.add(n0, c), kb.i32(r)) for r in range(chunk)]
            self._store(kb, t0, ns, self._int8_dots(kb, qbuf, sbuf, kb.i32(0), [kb.imin(n, last) for n in ns]))

    def _int8_dots(self, kb: KernelBuilder, qbuf, sbuf, x_row, rows: list) -> list:
        """W[rows] . x for the quantized prologue row x_row: per group d (dx / FINE) (FINE u . qx
        + u . qr) + c sx, the byte dots summed in 8-wide float accumulators, the c sx terms in
        scalars."""
        b, fmt = kb.b, FORMATS[self.weight_format]
        groups = self.k // GROUP
        row_bytes = fmt.row_bytes(self.k)
        w_rows = [row_offset(kb, r, row_bytes) for r in rows]
        distance = self._prefetch_distance(row_bytes, len(rows))
        accs = [kb.var(ir.Constant(F32X8, [0.0] * 8)) for _ in rows]
        offsets = [kb.var(kb.f32(0.0)) for _ in rows]
        q_row, s_row = b.mul(x_row, kb.i32(2 * self.k)), b.mul(x_row, kb.i32(2 * groups))
        with kb.loop(0, groups) as g:
            q_at, s_at = b.add(q_row, b.mul(g, kb.i32(2 * GROUP))), b.add(s_row, b.mul(g, kb.i32(2)))
            qx, qr = (b.load(b.gep(qbuf, [kb.wide(b.add(q_at, kb.i32(h)))], inbounds=True, source_etype=I8),
                             typ=I8X32, align=1) for h in (0, GROUP))
            step, total = (kb.load(sbuf, b.add(s_at, kb.i32(j)), DType.F32) for j in (0, 1))
            sx = kb.fmul(step, total)
            ahead = b.add(b.mul(kb.wide(g), kb.i64(fmt.nbytes)), kb.i64(distance))
            for acc, offset, w_row in zip(accs, offsets, w_rows):
                kb.prefetch(kb["w"], b.add(w_row, ahead))
                group = group_bytes(kb, fmt, kb["w"], w_row, g)
                dot = byte_dot(kb, group.u, qx, qr)
                acc.set(kb.fadd(acc.get(), kb.fmul(dot, splat(kb, kb.fmul(group.d, step), F32X8))))
                offset.set(kb.fadd(offset.get(), kb.fmul(group.c, sx)))
        return [kb.fadd(hsum(kb, acc.get()), offset.get()) for acc, offset in zip(accs, offsets)]

    def _host_band_tile(self, kb: KernelBuilder, t0, tokens: list, stored: list, qbuf, sbuf, n0) -> None:
        """The block's outputs for tile rows `tokens` from their int8 rows, a band of
        weight rows at a time (`_band_dots`)."""
        b = kb.b
        with kb.loop(0, kb.imin(kb.i32(self.rows_per_block), b.sub(kb.i32(self.n), n0)), BAND) as c:
            first = b.add(n0, c)
            sums = self._band_dots(kb, qbuf, sbuf, tokens, first)
            for t, keep in enumerate(stored):
                with kb.when(keep):
                    self._store_band(kb, b.add(t0, tokens[t]), first, sums[t])

    def _band_dots(self, kb: KernelBuilder, qbuf, sbuf, tokens: list, first) -> list:
        """W[first:first + BAND] . x_t for each tile row t, a vector each (lane r: row
        first + r). Per group the band's rows come in a few vector loads with the rows in
        the lanes (kernels/quant.py's banded forms), so one vpdpbusd takes a 4-byte slice
        of x_t (broadcast) against all of them and the group's scales multiply them at
        once: per token and group 16 vpdpbusd and a few vector ops for 16 rows, where
        float activations take 32 16-wide FMAs."""
        b, fmt = kb.b, FORMATS[self.weight_format]
        groups, words = self.k // GROUP, self.k // 2  # a quantized row in qbuf: qx and qr, 4 bytes to a word
        start = band_start(kb, fmt, first, self.k)
        accs = [kb.var(ir.Constant(BAND_F32, [0.0] * BAND)) for _ in tokens]
        fine = splat(kb, ir.Constant(I32, FINE.bit_length() - 1), BAND_I32)
        with kb.loop(0, groups) as g:
            at = band_group_at(kb, fmt, start, g)
            for line in range(0, BAND * fmt.nbytes, CACHE_LINE):
                kb.prefetch(kb["w"], b.add(at, kb.i64(BAND_PREFETCH_BYTES + line)))
            w = band_group(kb, fmt, kb["w"], at)
            # 4 tokens at a time, their dots' chains interleaved: vpdpbusd's latency (4
            # cycles on Zen 4) over its throughput (2 a cycle)
            for head in range(0, len(tokens), INT8_CHAINS // 2):
                batch = list(zip(tokens, accs))[head:head + INT8_CHAINS // 2]
                q_ats = [b.add(b.mul(t, kb.i32(words)), b.mul(g, kb.i32(2 * GROUP // 4))) for t, _ in batch]
                xs = [[kb.load(qbuf, b.add(q_at, kb.i32(h + j)), DType.I32) for j in range(GROUP // 4)]
                      for q_at in q_ats for h in (0, GROUP // 4)]  # each token's qx, then its qr
                dots = sliced_dots(kb, w.words, xs)
                for (t, acc), x_dot, r_dot in zip(batch, dots[::2], dots[1::2]):
                    s_at = b.mul(b.add(b.mul(t, kb.i32(groups)), g), kb.i32(2))
                    step, total = (kb.load(sbuf, b.add(s_at, kb.i32(j)), DType.F32) for j in (0, 1))
                    exact = b.add(b.shl(x_dot, fine), r_dot)  # sum(u (FINE qx + qr))
                    if w.m is None:  # c = shift d: the zero point's share taken in integers
                        exact = b.add(exact, splat(kb, b.mul(b.fptosi(total, I32), kb.i32(w.shift)), BAND_I32))
                    term = kb.fmul(w.d, kb.fmul(b.sitofp(exact, BAND_F32), splat(kb, step, BAND_F32)))
                    if w.m is not None:
                        term = kb.fadd(term, kb.fmul(w.m, splat(kb, kb.fmul(step, total), BAND_F32)))
                    acc.set(kb.fadd(acc.get(), term))
        return [acc.get() for acc in accs]

    def _store_band(self, kb: KernelBuilder, out_row, first, sums) -> None:
        """A band's outputs of token row out_row (all below N): one vector store where
        they need neither rounding nor a bias."""
        b = kb.b
        if self.out is not DType.F32 or self.bias:
            self._store(kb, out_row, [b.add(first, kb.i32(r)) for r in range(BAND)],
                        [b.extract_element(sums, kb.i32(r)) for r in range(BAND)])
            return
        at = b.add(row_offset(kb, out_row, self.n), kb.wide(first))
        b.store(sums, b.gep(kb["y"], [at], inbounds=True, source_etype=ir.FloatType()), align=4)

    @staticmethod
    def _prefetch_distance(row_bytes: int, rows: int) -> int:
        """Bytes ahead of a block-format row's current group to prefetch (HOST_PREFETCH_BYTES)."""
        return HOST_PREFETCH_BYTES if row_bytes >= HOST_PREFETCH_BYTES else 2 * rows * row_bytes

    def _host_block(self, kb: KernelBuilder) -> tuple:
        """(tile, output block, the tile's first token row, its rows) of this host block.
        Blocks run tile-major (linear id = tile * output blocks + output block), so a
        thread's contiguous range of blocks walks one tile's outputs before the next and
        prepares each tile (its prologue rows) once, kept in launch-scoped memory."""
        b, tpb = kb.b, self.tokens_per_block
        tiles = b.sdiv(b.add(kb["num_rows"], kb.i32(tpb - 1)), kb.i32(tpb))
        linear = b.add(b.mul(kb.block_id(1), tiles), kb.block_id(0))
        out_blocks = kb.i32(cdiv(self.n, self.rows_per_block))
        tile, out_block = b.udiv(linear, out_blocks), b.urem(linear, out_blocks)
        t0 = b.mul(tile, kb.i32(tpb))
        return tile, out_block, t0, kb.imin(kb.i32(tpb), b.sub(kb["num_rows"], t0))  # the last tile may be short

    def _host_tile(self, kb: KernelBuilder, t0, tokens: list, stored: list, xbuf, n0) -> None:
        """The block's outputs for tile rows `tokens` (the last repeated to fill the height)."""
        b = kb.b
        chunk = host_rows_per_chunk(len(tokens), self.rows_per_block)
        last = kb.i32(self.n - 1)
        x_offsets = [b.mul(t, kb.i32(self.k)) for t in tokens]
        with kb.loop(0, kb.imin(kb.i32(self.rows_per_block), b.sub(kb.i32(self.n), n0)), chunk) as c:
            n_first = b.add(n0, c)
            ns = [b.add(n_first, kb.i32(r)) for r in range(chunk)]
            rows = [kb.imin(n, last) for n in ns]  # rows past the end: read in bounds, not stored
            accs = self._tile_dots(kb, xbuf, x_offsets, rows)
            for t, keep in enumerate(stored):
                with kb.when(keep):
                    self._store(kb, b.add(t0, tokens[t]), ns, [hsum(kb, acc[t]) for acc in accs])

    def _tile_dots(self, kb: KernelBuilder, xbuf, x_offsets: list, rows: list) -> list[list]:
        """accs[r][t]: 16-wide partial sums of W[rows[r]] . x_t, x_t the buffered prologue
        row at x_offsets[t]."""
        b, k_dim = kb.b, self.k
        accs = [[kb.var(zero_vector()) for _ in x_offsets] for _ in rows]

        def xs(at) -> list:
            return [kb.load_packed(xbuf, b.add(at, off), DType.F32, HALF) for off in x_offsets]

        def accumulate(r: int, w, x_row: list) -> None:
            for acc, x in zip(accs[r], x_row):
                acc.set(kb.fadd(acc.get(), kb.fmul(w, x)))

        if self.weight_format is not None:
            fmt = FORMATS[self.weight_format]
            row_bytes = fmt.row_bytes(k_dim)
            w_rows = [row_offset(kb, r, row_bytes) for r in rows]
            distance = self._prefetch_distance(row_bytes, len(rows))
            with kb.loop(0, k_dim // GROUP) as g:
                i0 = b.mul(g, kb.i32(GROUP))
                x_lo, x_hi = xs(i0), xs(b.add(i0, kb.i32(HALF)))
                ahead = b.add(b.mul(kb.wide(g), kb.i64(fmt.nbytes * GROUP // fmt.block)), kb.i64(distance))
                for r, w_row in enumerate(w_rows):
                    kb.prefetch(kb["w"], b.add(w_row, ahead))
                    w_lo, w_hi = group_values(kb, fmt, kb["w"], w_row, g)
                    accumulate(r, w_lo, x_lo)
                    accumulate(r, w_hi, x_hi)
        else:
            w_rows = [row_offset(kb, r, k_dim) for r in rows]
            whole = k_dim - k_dim % HALF
            size = self.weight.itemsize
            with kb.loop(0, whole, HALF) as i:
                x_row = xs(i)
                for r, w_row in enumerate(w_rows):
                    at = b.add(w_row, kb.wide(i))
                    if HALF * size < CACHE_LINE:  # a whole line a step (f32) streams well unaided
                        kb.prefetch(kb["w"], b.add(b.mul(at, kb.i64(size)), kb.i64(HOST_PREFETCH_BYTES)))
                    accumulate(r, kb.load_packed(kb["w"], at, self.weight, HALF), x_row)
            for i in range(whole, k_dim):  # a ragged tail, elementwise into lane 0
                for r, w_row in enumerate(w_rows):
                    w = kb.load(kb["w"], b.add(w_row, kb.i64(i)), self.weight)
                    for off, acc in zip(x_offsets, accs[r]):
                        x = kb.load(xbuf, b.add(off, kb.i32(i)), DType.F32)
                        acc.set(b.insert_element(acc.get(), kb.fadd(b.extract_element(acc.get(), kb.i32(0)),
                                                                    kb.fmul(w, x)), kb.i32(0)))
        return [[acc.get() for acc in row] for row in accs]

    def _row_dots(self, kb: KernelBuilder, rows: list, x_at) -> list:
        """GPU body: W[rows] . x, each reduced over the block's lanes."""
        if self.weight_format is not None:
            totals = self._block_dots(kb, rows, x_at)
        else:
            accs = [kb.var(kb.f32(0.0)) for _ in rows]
            self._dense_dot(kb, [row_offset(kb, r, self.k) for r in rows], accs, x_at)
            totals = [acc.get() for acc in accs]
        return [kb.reduce(total) for total in totals]

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

    def _dense_dot(self, kb: KernelBuilder, w_rows: list, accs: list, x_at) -> None:
        b, vec = kb.b, self.vec
        with self._vec_loop(kb, self.k) as i:
            xs = x_at(i)
            for acc, w_row in zip(accs, w_rows):
                w_at = b.add(w_row, kb.wide(i))
                ws = kb.load_vector(kb["w"], w_at, self.weight, vec) if vec > 1 else [kb.load(kb["w"], w_at, self.weight)]
                total = acc.get()
                for x, w in zip(xs, ws):
                    total = kb.fadd(total, kb.fmul(x, w))
                acc.set(total)

    def _store(self, kb: KernelBuilder, out_row, ns: list, totals: list) -> None:
        """Outputs ns of token row out_row (those below N), rounded, plus the bias."""
        b = kb.b
        out_base = row_offset(kb, out_row, self.n)
        for n, total in zip(ns, totals):
            with kb.when(b.icmp_signed("<", n, kb.i32(self.n))):
                y = round_to(kb, total, self.out)
                if self.bias:
                    y = b.fadd(y, kb.load(kb["bias"], n, self.weight))
                kb.store(kb["y"], b.add(out_base, kb.wide(n)), y, self.out)


def host_rows_per_chunk(tokens: int, rows_per_block: int) -> int:
    """Weight rows a host tile of `tokens` rows works on together: rows x tokens 16-wide
    accumulators (at most HOST_ACCUMULATORS, rows a power of two up to HOST_CHUNK),
    dividing the block's rows."""
    rows = HOST_CHUNK
    while rows > 1 and rows * tokens > HOST_ACCUMULATORS:
        rows //= 2
    return math.gcd(rows, rows_per_block)


def tile_heights(tokens_per_block: int) -> list[int]:
    """The tile heights host GEMV code is specialised for: powers of two up to
    tokens_per_block, and it. A shorter tile runs in the next height up (a few rows
    computed twice, never stored): four variants compile in a third of the time of eight."""
    heights = [h for h in (1, 2, 4, 8, 16, 32) if h < tokens_per_block]
    return heights + [tokens_per_block]


def vector_width(k: int, *dtypes: DType) -> int:
    """Elements per 16-byte load of the widest dtype, if k rows split into whole vectors."""
    vec = 16 // max(d.itemsize for d in dtypes)
    return vec if k % vec == 0 else 1
