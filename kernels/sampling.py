"""Next-token selection on the device: penalties, structured-output masks, greedy / Gumbel-max sampling with
top-k, top-p and min-p, and top logprobs. One block per row; only token ids (and the
few numbers logprobs need) go back to the host.

Filters are thresholds found by bisection over the order-preserving integer key of
a float, so no kernel sorts: top-k keeps every token at least as likely as the k-th
(ties included), top-p keeps a token when the mass strictly above it is below
top_p, min-p keeps p >= min_p * p_max. The numpy oracle is
`fusec.runtime.sampler.reference_sample`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from llvmlite import ir

from fusec.fusion.codegen.builder import F32, I32, I64, KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.kernels.elementwise import RowKernel
from fusec.kernels.random import uniform_ir

MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI's API allows
BISECT_STEPS = 32  # halvings of a 32-bit key range: exact
INT_MIN = -(2 ** 31)


def float_key(kb: KernelBuilder, v: ir.Value) -> ir.Value:
    """An i32 that orders like the float v (IEEE bits, negatives flipped)."""
    b = kb.b
    bits = b.bitcast(v, I32)
    return b.select(b.icmp_signed("<", bits, kb.i32(0)), b.xor(bits, kb.i32(0x7FFFFFFF)), bits)


def _midpoint(kb: KernelBuilder, lo: ir.Value, hi: ir.Value) -> ir.Value:
    b = kb.b
    return b.trunc(b.ashr(b.add(b.sext(lo, I64), b.sext(hi, I64)), ir.Constant(I64, 1)), I32)


class _RowArgmax:
    """Per-lane running (best value, its first index) over a lane-strided loop, then
    the block's winner: the largest value, the lowest index among equals."""

    def __init__(self, kb: KernelBuilder, cols: int) -> None:
        self.kb, self.cols = kb, cols
        self.best, self.index = kb.var(kb.f32(-math.inf)), kb.var(kb.f32(cols))

    def offer(self, i: ir.Value, v: ir.Value, eligible: ir.Value | None = None) -> None:
        kb, b = self.kb, self.kb.b
        first = b.fcmp_ordered("==", self.index.get(), kb.f32(self.cols))
        better = b.or_(b.fcmp_ordered(">", v, self.best.get()), first)
        if eligible is not None:
            better = b.and_(better, eligible)
        self.best.set(b.select(better, v, self.best.get()))
        self.index.set(b.select(better, b.sitofp(i, F32), self.index.get()))

    def result(self) -> tuple[ir.Value, ir.Value]:
        """(max value, its index as i32); indices are exact in float32 below 2**24."""
        kb, b = self.kb, self.kb.b
        top = kb.reduce(self.best.get(), "max")
        mine = b.select(b.fcmp_ordered("==", self.best.get(), top), self.index.get(), kb.f32(self.cols))
        return top, b.fptosi(kb.reduce(mine, "min"), I32)


def _row_max(kb: KernelBuilder, cols: int, x) -> tuple[ir.Value, ir.Value]:
    """(the largest of x(0..cols-1), the first index holding it), NaNs ignored (a row
    of NaNs gives index 0). Two passes, a max then a min index, so each is a plain
    reduction that vectorises on the host: one pass carrying (best, index) stayed
    scalar (a greedy row of 49152 logits, one thread: 107 -> 4 us a launch)."""
    b = kb.b
    top = kb.var(kb.f32(-math.inf))
    with kb.lane_loop(cols) as i:
        top.set(kb.fmax(top.get(), x(i)))
    mx = kb.reduce(top.get(), "max")
    first = kb.var(kb.i32(cols))
    with kb.lane_loop(cols) as i:
        first.set(kb.imin(first.get(), b.select(b.fcmp_ordered("==", x(i), mx), i, kb.i32(cols))))
    index = b.fptosi(kb.reduce(b.sitofp(first.get(), F32), "min"), I32)  # exact below 2**24
    return mx, b.select(b.icmp_signed("<", index, kb.i32(cols)), index, kb.i32(0))


@dataclass(frozen=True)
class ApplyPenalties(RowKernel):
    """Sparse edits of each row's logits, in place (the sampler's private copy of the
    rows it samples): for entry e of row r (entries starts[r]..starts[r+1]-1, distinct
    tokens), v = logits[r, tokens[e]] is saved in
    orig[e] and replaced by (v > 0 ? v / rep[e] : v * rep[e]) - sub[e]. Repetition,
    frequency and presence penalties, and min_tokens bans (sub = +inf), in one launch."""

    family = "apply_penalties"
    vocab: int

    def params(self) -> list[Param]:
        return self._params("logits", "starts", "tokens", "rep", "sub", "orig")

    def body(self, kb: KernelBuilder) -> None:
        b, r = kb.b, kb.block_id(0)
        start = kb.load(kb["starts"], r, DType.I32)
        stop = kb.load(kb["starts"], b.add(r, kb.i32(1)), DType.I32)
        base = b.mul(kb.wide(r), kb.i64(self.vocab))
        with kb.loop(b.add(start, kb.lane()), stop, kb.lanes()) as e:
            at = b.add(base, kb.wide(kb.load(kb["tokens"], e, DType.I32)))
            v = kb.load(kb["logits"], at, DType.F32)
            kb.store(kb["orig"], e, v, DType.F32)
            rep = kb.load(kb["rep"], e, DType.F32)
            scaled = b.select(b.fcmp_ordered(">", v, kb.f32(0.0)), b.fdiv(v, rep), b.fmul(v, rep))
            kb.store(kb["logits"], at, b.fsub(scaled, kb.load(kb["sub"], e, DType.F32)), DType.F32)


@dataclass(frozen=True)
class ApplyTokenMask(RowKernel):
    """Structured outputs' allowed tokens, in place (the sampler's private copy): block j
    sets logits[mask_rows[j], t] to -inf where bit t % 32 of word t // 32 of masks row j
    is clear (llguidance's packed bitmask, one row per constrained sequence)."""

    family = "apply_token_mask"
    vocab: int

    def params(self) -> list[Param]:
        return self._params("logits", "mask_rows", "masks")

    def body(self, kb: KernelBuilder) -> None:
        b, j, V = kb.b, kb.block_id(0), self.vocab
        words = (V + 31) // 32
        base = b.mul(kb.wide(kb.load(kb["mask_rows"], j, DType.I32)), kb.i64(V))
        mask_base = b.mul(kb.wide(j), kb.i64(words))
        with kb.lane_loop(V) as i:
            word = kb.load(kb["masks"], b.add(mask_base, kb.wide(b.lshr(i, kb.i32(5)))), DType.I32)
            allowed = b.trunc(b.lshr(word, b.and_(i, kb.i32(31))), ir.IntType(1))
            at = b.add(base, kb.wide(i))
            kb.store(kb["logits"], at, b.select(allowed, kb.load(kb["logits"], at, DType.F32), kb.f32(-math.inf)),
                     DType.F32)


@dataclass(frozen=True)
class SampleRows(RowKernel):
    """tokens[r] from logits row rows[r]: argmax when temperature[r] == 0, else a
    Gumbel-max draw (uniforms from (seeds[r], counters[r], token)) over the tokens the
    filters keep. picked[r] is the logit of the chosen token. work is [rows, vocab]
    float32 scratch for the sampled rows' unnormalised probabilities."""

    family = "sample_rows"
    vocab: int

    def params(self) -> list[Param]:
        return self._params("logits", "rows", "temperature", "top_k", "top_p", "min_p", "seeds", "counters",
                            "work", "tokens", "picked")

    def body(self, kb: KernelBuilder) -> None:
        b, r, V = kb.b, kb.block_id(0), self.vocab
        base = b.mul(kb.wide(kb.load(kb["rows"], r, DType.I32)), kb.i64(V))
        work = b.mul(kb.wide(r), kb.i64(V))

        def x(i):
            return kb.load(kb["logits"], b.add(base, kb.wide(i)), DType.F32)

        mx, greedy_token = _row_max(kb, V, x)
        token = kb.var(greedy_token)
        temperature = kb.load(kb["temperature"], r, DType.F32)
        with kb.when(b.fcmp_ordered(">", temperature, kb.f32(0.0))):
            drawn = self._draw(kb, r, x, mx, temperature, work)
            # nothing kept (a row of -inf or NaN logits): the greedy token, never id V
            token.set(b.select(b.icmp_signed("<", drawn, kb.i32(V)), drawn, greedy_token))
        with kb.when(b.icmp_unsigned("==", kb.lane(), kb.i32(0))):
            kb.store(kb["tokens"], r, token.get(), DType.I32)
            kb.store(kb["picked"], r, x(token.get()), DType.F32)

    def _draw(self, kb: KernelBuilder, r, x, mx, temperature, work) -> ir.Value:
        b, V = kb.b, self.vocab
        inv_t = b.fdiv(kb.f32(1.0), temperature)
        mz = b.fmul(mx, inv_t)  # = max of z: rounding is monotone

        def z(i):
            return b.fmul(x(i), inv_t)

        # top-k: the largest key K with count(key(z) >= K) >= k
        k = kb.load(kb["top_k"], r, DType.I32)
        k_key = kb.var(kb.i32(INT_MIN))
        with kb.when(b.and_(b.icmp_signed(">", k, kb.i32(0)), b.icmp_signed("<", k, kb.i32(V)))):
            lo, hi = kb.var(kb.i32(INT_MIN)), kb.var(b.add(float_key(kb, mz), kb.i32(1)))
            with kb.loop(0, BISECT_STEPS):
                mid = _midpoint(kb, lo.get(), hi.get())
                count = kb.var(kb.f32(0.0))
                with kb.lane_loop(V) as i:
                    above = b.icmp_signed(">=", float_key(kb, z(i)), mid)
                    count.set(b.fadd(count.get(), b.uitofp(above, F32)))
                ok = b.fcmp_ordered(">=", kb.reduce(count.get()), b.sitofp(k, F32))
                lo.set(b.select(ok, mid, lo.get()))
                hi.set(b.select(ok, hi.get(), mid))
            k_key.set(lo.get())
        # unnormalised probabilities of the tokens top-k keeps, and their sum
        total = kb.var(kb.f32(0.0))
        with kb.lane_loop(V) as i:
            zi = z(i)
            e = b.select(b.icmp_signed(">=", float_key(kb, zi), k_key.get()), kb.exp(b.fsub(zi, mz)), kb.f32(0.0))
            kb.store(kb["work"], b.add(work, kb.wide(i)), e, DType.F32)
            total.set(b.fadd(total.get(), e))
        total_mass = kb.reduce(total.get())
        # top-p: the smallest key K (of a probability, so bits order) whose strictly-greater
        # mass is below top_p of the total
        p = kb.load(kb["top_p"], r, DType.F32)
        p_key = kb.var(kb.i32(0))

        def e_at(i):
            return kb.load(kb["work"], b.add(work, kb.wide(i)), DType.F32)

        with kb.when(b.fcmp_ordered("<", p, kb.f32(1.0))):
            bound = b.fmul(p, total_mass)
            lo, hi = kb.var(kb.i32(-1)), kb.var(kb.i32(0x7F800000))
            with kb.loop(0, BISECT_STEPS):
                mid = _midpoint(kb, lo.get(), hi.get())
                mass = kb.var(kb.f32(0.0))
                with kb.lane_loop(V) as i:
                    e = e_at(i)
                    above = b.icmp_signed(">", b.bitcast(e, I32), mid)
                    mass.set(b.fadd(mass.get(), b.select(above, e, kb.f32(0.0))))
                ok = b.fcmp_ordered("<", kb.reduce(mass.get()), bound)
                hi.set(b.select(ok, mid, hi.get()))
                lo.set(b.select(ok, lo.get(), mid))
            p_key.set(hi.get())
        min_p = kb.load(kb["min_p"], r, DType.F32)
        seed, counter = kb.load(kb["seeds"], r, DType.I32), kb.load(kb["counters"], r, DType.I32)
        arg = _RowArgmax(kb, V)
        with kb.lane_loop(V) as i:
            e = e_at(i)
            kept = b.and_(b.and_(b.fcmp_ordered(">", e, kb.f32(0.0)), b.fcmp_ordered(">=", e, min_p)),
                          b.icmp_signed(">=", b.bitcast(e, I32), p_key.get()))
            gumbel = b.fneg(kb.log(b.fneg(kb.log(uniform_ir(kb, seed, counter, i)))))
            arg.offer(i, b.fadd(b.fsub(z(i), mz), gumbel), kept)
        return arg.result()[1]


@dataclass(frozen=True)
class TopLogprobs(RowKernel):
    """For logits row rows[r]: lse[r] = log-sum-exp of the row, and its k largest
    logits with their ids (descending, lower id first on ties) in rows of
    MAX_LOGPROBS."""

    family = "top_logprobs"
    vocab: int

    def params(self) -> list[Param]:
        return [Param(n, "ptr") for n in ("logits", "rows", "lse", "top_ids", "top_vals")] + \
            [Param("k", "i32"), Param("num_rows", "i32")]

    def body(self, kb: KernelBuilder) -> None:
        b, r, V = kb.b, kb.block_id(0), self.vocab
        base = b.mul(kb.wide(kb.load(kb["rows"], r, DType.I32)), kb.i64(V))

        def x(i):
            return kb.load(kb["logits"], b.add(base, kb.wide(i)), DType.F32)

        m = kb.var(kb.f32(-math.inf))
        with kb.lane_loop(V) as i:
            m.set(kb.fmax(m.get(), x(i)))
        top = kb.reduce(m.get(), "max")
        s = kb.var(kb.f32(0.0))
        with kb.lane_loop(V) as i:
            s.set(kb.fadd(s.get(), kb.exp(b.fsub(x(i), top))))
        lse = b.fadd(top, kb.log(kb.reduce(s.get())))
        out = b.mul(r, kb.i32(MAX_LOGPROBS))
        with kb.when(b.icmp_unsigned("==", kb.lane(), kb.i32(0))):
            kb.store(kb["lse"], r, lse, DType.F32)
        prev_v, prev_i = kb.var(kb.f32(math.inf)), kb.var(kb.i32(-1))
        with kb.loop(0, kb["k"]) as j:
            arg = _RowArgmax(kb, V)
            with kb.lane_loop(V) as i:
                v = x(i)
                after = b.or_(b.fcmp_ordered("<", v, prev_v.get()),
                              b.and_(b.fcmp_ordered("==", v, prev_v.get()), b.icmp_signed(">", i, prev_i.get())))
                arg.offer(i, v, after)
            v, index = arg.result()
            with kb.when(b.icmp_unsigned("==", kb.lane(), kb.i32(0))):
                kb.store(kb["top_vals"], b.add(out, j), v, DType.F32)
                kb.store(kb["top_ids"], b.add(out, j), index, DType.I32)
            prev_v.set(v)
            prev_i.set(index)
