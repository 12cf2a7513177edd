"""Mixture-of-experts kernels and their patterns: the router and the routed expert GEMVs.

One MoE MLP block (decode or prefill) and its launches:
    s     = add(residual, attn_out)                       \\
    xn    = rms_norm(s)                                    > add_rms_norm_moe_route
    route = moe_route(xn, w_router)                       /  (writes s, xn and route)
    gu    = moe_matmul(xn, route, w_gate_up)                 moe_gemv
    act   = silu_mul(gu, groups=S)                        \\ silu_mul_moe_gemv (the slots'
    y     = moe_matmul(act, route, w_down, combine=True)  /  weighted sum in the kernel)
    x     = add(s, y)                                        the next layer's first GEMV
route[T, 2S] holds each token's S slots: expert ids (as floats), then weights.

MoeRoute: one block per token. Lanes split the hidden dim of a pass of router rows
(their partial sums meet in a tree in block-shared memory), the logits stay in shared
memory for the softmax, the group-limited mask and the top-k (k rounds of a block
argmax, so nothing sorts).

MoeGemv: Gemv over the selected experts' rows only, so a decode token reads top_k of
the experts' matrices. On a GPU a block owns a few output rows of one token: of one
slot, or with `combine` of every slot, which it sums with the route's weights (no
cross-block reduction). On the host a block owns output rows of a tile of tokens and
walks the experts they were routed to, each expert's (token, slot) pairs together, so
a batch reads each picked expert once a tile, not once a token; `combine` sums a
token's slots in the block. Prologues: none (x shared by the slots, or one part per
slot) or a gated activation of the slot's own [gate | up]. Expert ids are clamped into
the weight before any address is formed, so a corrupt route never reads out of bounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from llvmlite import ir

from fusec.fusion.codegen.builder import I32, KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.fusion.patterns import Match, Pattern, PNode
from fusec.fusion.plan import Launch, LowerContext
from fusec.kernels.base import GATES, cdiv, round_to, row_offset
from fusec.kernels.gemv import Gemv, host_rows_per_chunk, tile_heights, vector_width
from fusec.kernels.quant import BAND, FORMATS, hsum, takes_int8_dots
from fusec.kernels.registry import ADD, D, NORM_AFTER_ADD, V, _dtype, _rows

F32 = DType.F32
TRUE, FALSE = ir.Constant(ir.IntType(1), 1), ir.Constant(ir.IntType(1), 0)
ROUTE_PROLOGUES = ("none", "add_rms_norm")
# Router rows a pass, a partial sum each a lane: on the GPU 16 (8 KiB of shared memory for
# the lanes' partials, 7 barriers a pass); on the host 8, a vector accumulator each
ROUTER_ROWS_GPU, ROUTER_ROWS_HOST = 16, 8
GRID_Y = 65535  # CUDA's limit on grid y (output blocks)
HOST_PAIRS = 8  # most (token, slot) pairs of one expert a host tile dots together
# Output rows a host block takes of each expert its tokens were routed to: a block reads
# that many consecutive rows of every such expert, and longer runs stream better (on the
# 2-core EPYC a Qwen3-MoE-shaped decode step, 8 of 64 experts of 1536 x 1024 q8_0, was
# 6-10% faster at 64 rows than at the dense GEMV's 16; 128 no better than 64)
HOST_EXPERT_ROWS = 64
# A host tile's tokens: each tile reads every expert its tokens picked once, so a prefill
# reads an expert once per tile of up to 256 tokens; fewer where their prologue rows would
# pass 1 MiB of launch-scoped floats (which live on the calling thread's stack)
HOST_TILE_TOKENS = 256
HOST_TILE_FLOATS = 1 << 18


@dataclass(frozen=True, kw_only=True)
class MoeRoute(Gemv):
    """route[t] = the routing of token t: logits = x . w (w's `n` rows: the `experts`
    routed ones, and the shared experts' gate with `shared_gate`), softmax over the
    routed ones, [group-limited] top_k, [renormalized,] times `scaling`, then the
    `shared` always-on slots (fusec.fusion.ops.moe_route).

    Gemv's fields: k is the hidden size; prologue "none" or "add_rms_norm" (the sum
    written with residual_out, the normed row with normed_out); rows_per_block is the
    router rows a pass."""

    family = "moe_route"
    experts: int
    top_k: int
    shared: int = 0
    shared_gate: bool = False
    renormalize: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    normed_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prologue not in ROUTE_PROLOGUES or self.weight_format or self.bias or self.gather:
            raise ValueError(f"a router reads a dense weight after one of {ROUTE_PROLOGUES}")
        if self.n != self.experts + self.shared_gate or self.experts % self.n_group:
            raise ValueError(f"{self.n} router rows for {self.experts} experts in {self.n_group} groups")
        if not (1 <= self.top_k <= self.experts and 1 <= self.topk_group <= self.n_group):
            raise ValueError(f"top_k {self.top_k} of {self.experts}, {self.topk_group} of {self.n_group} groups")

    @property
    def slots(self) -> int:
        return self.top_k + self.shared

    def params(self) -> list[Param]:
        p = ["x"] if self.prologue == "none" else ["a", "b", "norm_w"]
        p += ["residual"] * self.residual_out + ["normed"] * self.normed_out + ["w", "route"]
        return [Param(n, "ptr") for n in p] + [Param("num_rows", "i32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return dims["num_rows"], 1

    def body(self, kb: KernelBuilder) -> None:
        b, t = kb.b, kb.block_id(0)
        x_at = self._prologue(kb, t, TRUE)  # writes the residual sum on the way
        if self.normed_out:
            base = row_offset(kb, t, self.k)
            with self._vec_loop(kb, self.k) as i:
                for j, v in enumerate(x_at(i)):
                    kb.store(kb["normed"], b.add(base, kb.wide(b.add(i, kb.i32(j)))), v, self.act)
        scores = kb.shared(self.n, "scores")  # the logits, then the routed experts' probabilities
        self._logits(kb, x_at, scores)
        self._softmax(kb, scores)
        out = row_offset(kb, t, 2 * self.slots)
        first_lane = b.icmp_unsigned("==", kb.lane(), kb.i32(0))

        def store(slot: ir.Value | int, value: ir.Value) -> None:
            kb.store(kb["route"], b.add(out, kb.wide(kb.i32(slot) if isinstance(slot, int) else slot)), value, F32)

        total = kb.var(kb.f32(0.0))
        scale = 1.0 if self.renormalize else self.scaling  # renormalized weights are scaled after

        def emit(j: ir.Value, weight: ir.Value, expert: ir.Value) -> None:
            total.set(b.fadd(total.get(), weight))
            with kb.when(first_lane):
                store(j, b.sitofp(expert, ir.FloatType()))
                store(b.add(j, kb.i32(self.slots)), weight if scale == 1.0 else b.fmul(weight, kb.f32(scale)))

        _largest(kb, self.experts, self.top_k, self._masked(kb, scores), emit)
        with kb.when(first_lane):
            if self.renormalize:  # lane 0 reads back the weights it wrote
                with kb.loop(self.slots, self.slots + self.top_k) as j:
                    at = b.add(out, kb.wide(j))
                    w = b.fdiv(kb.load(kb["route"], at, F32), total.get())
                    kb.store(kb["route"], at, w if self.scaling == 1.0 else b.fmul(w, kb.f32(self.scaling)), F32)
            gate = kb.f32(1.0)
            if self.shared_gate:
                logit = kb.load(scores, kb.i32(self.experts), F32)
                gate = b.fdiv(kb.f32(1.0), b.fadd(kb.f32(1.0), kb.exp(b.fneg(logit))))
            for j in range(self.shared):
                store(self.top_k + j, kb.f32(self.experts + j))
                store(self.slots + self.top_k + j, gate)

    def _logits(self, kb: KernelBuilder, x_at, scores: ir.Value) -> None:
        """scores[e] = x . w[e] for every router row, rows_per_block rows a pass."""
        b, per, lanes = kb.b, self.rows_per_block, self.lanes(kb.target)
        partial = kb.shared(per * lanes, "partial")  # [row][lane]
        last = kb.i32(self.n - 1)
        with kb.loop(0, self.n, per) as e0:
            rows = [kb.imin(b.add(e0, kb.i32(r)), last) for r in range(per)]  # the last pass repeats the last row
            accs = [kb.var(kb.f32(0.0)) for _ in rows]
            self._dense_dot(kb, [row_offset(kb, r, self.k) for r in rows], accs, x_at)
            for r, acc in enumerate(accs):
                kb.store(partial, b.add(kb.i32(r * lanes), kb.lane()), acc.get(), F32)
            # every row's lane partials halve together: log2(lanes) barriers a pass, not a reduce a row
            width = lanes // 2
            while width:
                kb.barrier()
                with kb.lane_loop(per * width) as j:
                    at = b.add(b.mul(b.udiv(j, kb.i32(width)), kb.i32(lanes)), b.urem(j, kb.i32(width)))
                    pair = kb.fadd(kb.load(partial, at, F32), kb.load(partial, b.add(at, kb.i32(width)), F32))
                    kb.store(partial, at, pair, F32)
                width //= 2
            kb.barrier()
            with kb.lane_loop(per) as r:
                e = b.add(e0, r)
                with kb.when(b.icmp_signed("<", e, kb.i32(self.n))):
                    kb.store(scores, e, kb.load(partial, b.mul(r, kb.i32(lanes)), F32), F32)
            kb.barrier()  # the partials are read before the next pass writes them

    def _softmax(self, kb: KernelBuilder, scores: ir.Value) -> None:
        """The routed experts' logits -> probabilities, in place (the gate's logit stays)."""
        b, experts = kb.b, self.experts
        top = kb.var(kb.f32(-math.inf))
        with kb.lane_loop(experts) as e:
            top.set(kb.fmax(top.get(), kb.load(scores, e, F32)))
        mx = kb.reduce(top.get(), "max")
        total = kb.var(kb.f32(0.0))
        with kb.lane_loop(experts) as e:
            total.set(kb.fadd(total.get(), kb.exp(b.fsub(kb.load(scores, e, F32), mx))))
        denom = kb.reduce(total.get())
        with kb.lane_loop(experts) as e:  # each lane rewrites only what it read
            kb.store(scores, e, b.fdiv(kb.exp(b.fsub(kb.load(scores, e, F32), mx)), denom), F32)
        kb.barrier()

    def _masked(self, kb: KernelBuilder, scores: ir.Value) -> Callable[[ir.Value], ir.Value]:
        """score(e), or with groups 0 outside the topk_group groups whose best expert
        scores highest (DeepSeek's group-limited greedy)."""
        b = kb.b
        if self.n_group == 1:
            return lambda e: kb.load(scores, e, F32)
        size = self.experts // self.n_group
        best = kb.shared(self.n_group, "group_best")
        with kb.lane_loop(self.n_group) as g:
            m = kb.var(kb.f32(-math.inf))
            with kb.loop(0, size) as j:
                m.set(kb.fmax(m.get(), kb.load(scores, b.add(b.mul(g, kb.i32(size)), j), F32)))
            kb.store(best, g, m.get(), F32)
        kb.barrier()
        # the kept groups: those ranked at or before the last one picked
        last_v, last_g = _largest(kb, self.n_group, self.topk_group, lambda g: kb.load(best, g, F32))

        def masked(e: ir.Value) -> ir.Value:
            g = b.udiv(e, kb.i32(size))
            v = kb.load(best, g, F32)
            kept = b.or_(b.fcmp_ordered(">", v, last_v),
                         b.and_(b.fcmp_ordered("==", v, last_v), b.icmp_signed("<=", g, last_g)))
            return b.select(kept, kb.load(scores, e, F32), kb.f32(0.0))
        return masked


def _largest(kb: KernelBuilder, count: int, picks: int, value: Callable[[ir.Value], ir.Value],
             emit: Callable[[ir.Value, ir.Value, ir.Value], None] | None = None) -> tuple[ir.Value, ir.Value]:
    """The `picks` largest of value(0..count-1), largest first and the lower index first
    among equals (a stable argsort of -value), NaNs never: round j finds the best entry
    ranked after round j - 1's and calls emit(j, value, index) (every lane, with the same
    values; index clamped into [0, count)). Returns the last round's (value, index)."""
    b = kb.b
    prev_v, prev_i = kb.var(kb.f32(math.inf)), kb.var(kb.i32(-1))
    with kb.loop(0, picks) as j:
        best, index = kb.var(kb.f32(-math.inf)), kb.var(kb.i32(count))
        with kb.lane_loop(count) as i:
            v = value(i)
            after = b.or_(b.fcmp_ordered("<", v, prev_v.get()),
                          b.and_(b.fcmp_ordered("==", v, prev_v.get()), b.icmp_signed(">", i, prev_i.get())))
            first = b.icmp_signed("==", index.get(), kb.i32(count))
            better = b.and_(after, b.or_(b.fcmp_ordered(">", v, best.get()), first))
            best.set(b.select(better, v, best.get()))
            index.set(b.select(better, i, index.get()))
        top = kb.reduce(best.get(), "max")
        mine = b.select(b.fcmp_ordered("==", best.get(), top), b.sitofp(index.get(), ir.FloatType()), kb.f32(count))
        at = kb.imin(b.fptosi(kb.reduce(mine, "min"), I32), kb.i32(count - 1))  # indices are exact floats
        if emit is not None:
            emit(j, top, at)
        prev_v.set(top)
        prev_i.set(at)
    return prev_v.get(), prev_i.get()


@dataclass(frozen=True, kw_only=True)
class MoeGemv(Gemv):
    """y[t, slot j] = W_e . x_j for e = route[t, j] (W[experts * n, k]: the experts'
    [n, k] matrices one after another), x_j the prologue of x[t] (or of its j-th part,
    `per_slot`); with `combine`, y[t] = sum_j route[t, slots + j] * W_e . x_j.

    Gemv's fields keep their meaning (prologue "none" or a gated one; weight_format).
    GPU: one token a block, grid (tokens, slots * output blocks), or (tokens, output
    blocks) with combine. `host_tiles` (the host's body): a block takes a tile of
    `tokens_per_block` tokens and `rows_per_block` output rows, and walks the experts
    its tokens were routed to, each expert's (token, slot) pairs in tiles of up to
    HOST_PAIRS with the host GEMV's 16-wide tile dots: each weight group is read and
    decoded once for all the pairs of the tile that share its expert, where a
    block per token would read it once per token (a batch of 32 decode tokens routed
    top-8 of 64 reads about 4x fewer expert bytes). A CPU thread groups a tile's pairs
    by expert (a counting sort) and computes their prologue rows once, in launch-scoped
    memory, for every block of the tile it runs; with `combine` a block sums each
    token's slots in launch-scoped memory before storing its rows. With int8_dots over
    banded experts (kernels/quant.py) every pair takes Gemv's band dots; over GGUF-form
    ones a lone pair takes the row-at-a-time int8 dots, more pairs float tiles."""

    family = "moe_gemv"
    experts: int
    slots: int
    combine: bool = False
    per_slot: bool = False
    host_tiles: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prologue not in ("none", *GATES) or self.bias or self.gather or self.residual_out \
                or (self.tokens_per_block != 1 and not self.host_tiles) or (self.int8_dots and not self.host_tiles):
            raise ValueError(f"a MoE GEMV's prologue is none or one of {tuple(GATES)}; one token a block on a GPU")
        if self.banded and not self.host_tiles:
            raise ValueError(f"{self.weight_format} expert weights are read by the host's tiles")

    @property
    def out_blocks(self) -> int:
        return cdiv(self.n, self.rows_per_block)

    @property
    def blocks_per_token(self) -> int:
        return self.out_blocks * (1 if self.combine else self.slots)

    def params(self) -> list[Param]:
        names = ["gu" if self.prologue in GATES else "x", "route", "w", "y"]
        return [Param(n, "ptr") for n in names] + [Param("num_rows", "i32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        if self.host_tiles:
            return cdiv(dims["num_rows"], self.tokens_per_block), self.out_blocks
        return dims["num_rows"], self.blocks_per_token

    def body(self, kb: KernelBuilder) -> None:
        if self.host_tiles:
            if kb.target.is_gpu:
                raise ValueError("host tiles are the host's")
            self._tiled_body(kb)
            return
        b = kb.b
        t, column = kb.block_id(0), kb.block_id(1)
        n0 = b.mul(b.urem(column, kb.i32(self.out_blocks)), kb.i32(self.rows_per_block))
        ns = [b.add(n0, kb.i32(r)) for r in range(self.rows_per_block)]
        if self.combine:
            sums = [kb.var(kb.f32(0.0)) for _ in ns]
            with kb.loop(0, self.slots) as s:
                expert, weight = self._route(kb, t, s)
                for acc, total in zip(sums, self._slot_dots(kb, t, s, expert, ns)):
                    acc.set(kb.fadd(acc.get(), kb.fmul(weight, total)))
            slot, totals = None, [acc.get() for acc in sums]
        else:
            slot = b.udiv(column, kb.i32(self.out_blocks))
            totals = self._slot_dots(kb, t, slot, self._route(kb, t, slot)[0], ns)
        with kb.when(b.icmp_unsigned("==", kb.lane(), kb.i32(0))):
            self._store_rows(kb, t, slot, ns, totals)

    def _route(self, kb: KernelBuilder, t: ir.Value, slot: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(slot's expert clamped into [0, experts), its weight) for token t."""
        b = kb.b
        base = b.add(row_offset(kb, t, 2 * self.slots), kb.wide(slot))
        raw = kb.load(kb["route"], base, F32)
        # clamped as a float: converting NaN or a value out of range to an int is undefined
        clamped = kb.fmax(kb.fmin(raw, kb.f32(self.experts - 1)), kb.f32(0.0))
        return b.fptosi(clamped, I32), kb.load(kb["route"], b.add(base, kb.i64(self.slots)), F32)

    def _source_row(self, kb: KernelBuilder, t: ir.Value, slot: ir.Value) -> ir.Value:
        """The prologue's input row: x[T, slots * K] (or [T, slots * 2K]) is x[T * slots, K]."""
        b = kb.b
        return b.add(b.mul(t, kb.i32(self.slots)), slot) if self.per_slot else t

    def _slot_dots(self, kb: KernelBuilder, t: ir.Value, slot: ir.Value, expert: ir.Value, ns: list) -> list:
        """W_expert[ns] . x_slot, reduced over the block's lanes (rows past n repeat the
        expert's last row: read in bounds, never stored)."""
        b = kb.b
        x_at = self._prologue(kb, self._source_row(kb, t, slot), FALSE)
        first = b.mul(expert, kb.i32(self.n))
        return self._row_dots(kb, [b.add(first, kb.imin(n, kb.i32(self.n - 1))) for n in ns], x_at)

    def _store_rows(self, kb: KernelBuilder, t: ir.Value, slot: ir.Value | None, ns: list, totals: list) -> None:
        """Outputs ns (those below n) of token t, of `slot` or (None) combined."""
        b = kb.b
        width = self.n if slot is None else self.slots * self.n
        base = row_offset(kb, t, width)
        if slot is not None:
            base = b.add(base, b.mul(kb.wide(slot), kb.i64(self.n)))
        for n, total in zip(ns, totals):
            with kb.when(b.icmp_signed("<", n, kb.i32(self.n))):
                kb.store(kb["y"], b.add(base, kb.wide(n)), round_to(kb, total, self.out), self.out)

    def _tiled_body(self, kb: KernelBuilder) -> None:
        b, tpb, slots = kb.b, self.tokens_per_block, self.slots
        tile, out_block, t0, count = self._host_block(kb)  # a tile's pairs are grouped once a thread
        parts = slots if self.per_slot else 1
        xbuf = kb.launch_local(F32, tpb * parts * self.k)  # prologue rows: a token's, or a pair's
        qbuf, sbuf = self._int8_buffers(kb, tpb * parts)  # ... quantized (int8_dots)
        starts = kb.launch_local(DType.I32, self.experts + 1)  # expert e's pairs: order[starts[e]:starts[e + 1]]
        order = kb.launch_local(DType.I32, tpb * slots)  # pairs (local token * slots + slot) by expert
        held = kb.launch_local(DType.I32, init=kb.i32(-1))  # the tile they describe
        with kb.when(b.icmp_signed("!=", kb.load(held, kb.i32(0), DType.I32), tile)):
            self._prepare_tile(kb, t0, count, parts, xbuf, starts, order, qbuf, sbuf)
            kb.store(held, kb.i32(0), tile, DType.I32)
        n0 = b.mul(out_block, kb.i32(self.rows_per_block))
        rows_here = kb.imin(kb.i32(self.rows_per_block), b.sub(kb.i32(self.n), n0))
        sums = kb.launch_local(F32, tpb * self.rows_per_block) if self.combine else None  # [token][row]
        if sums is not None:
            with kb.loop(0, b.mul(count, kb.i32(self.rows_per_block))) as i:
                kb.store(sums, i, kb.f32(0.0), F32)
        with kb.loop(0, self.experts) as e:
            end = kb.load(starts, b.add(e, kb.i32(1)), DType.I32)
            with kb.loop(kb.load(starts, e, DType.I32), end, HOST_PAIRS) as p0:
                self._expert_pairs(kb, t0, e, p0, kb.imin(kb.i32(HOST_PAIRS), b.sub(end, p0)), order,
                                   (xbuf, qbuf, sbuf), n0, rows_here, sums)
        if sums is not None:
            with kb.loop(0, count) as t:
                with kb.loop(0, rows_here) as r:
                    total = kb.load(sums, b.add(b.mul(t, kb.i32(self.rows_per_block)), r), F32)
                    kb.store(kb["y"], b.add(row_offset(kb, b.add(t0, t), self.n), kb.wide(b.add(n0, r))),
                             round_to(kb, total, self.out), self.out)

    def _prepare_tile(self, kb: KernelBuilder, t0, count, parts: int, xbuf, starts, order, qbuf, sbuf) -> None:
        """The tile's prologue rows into xbuf (and quantized into qbuf / sbuf with int8_dots),
        and its (token, slot) pairs sorted by expert into order, with starts[e] where expert
        e's begin (a counting sort: routes are ids)."""
        b, slots, i32 = kb.b, self.slots, DType.I32
        with kb.loop(0, b.mul(count, kb.i32(parts))) as j:  # j = local token * parts + part
            t, part = b.udiv(j, kb.i32(parts)), b.urem(j, kb.i32(parts))
            x_at = self._prologue(kb, self._source_row(kb, b.add(t0, t), part), FALSE)
            at = b.mul(j, kb.i32(self.k))
            with self._vec_loop(kb, self.k) as i:
                for c, v in enumerate(x_at(i)):
                    kb.store(xbuf, b.add(at, b.add(i, kb.i32(c))), v, F32)
            if self.int8_dots:
                self._quantize_row(kb, xbuf, qbuf, sbuf, j)

        def experts_of_pairs(visit: Callable[[ir.Value, ir.Value], None]) -> None:
            with kb.loop(0, b.mul(count, kb.i32(slots))) as pair:
                t, s = b.udiv(pair, kb.i32(slots)), b.urem(pair, kb.i32(slots))
                visit(pair, self._route(kb, b.add(t0, t), s)[0])

        def bump(at: ir.Value, value: ir.Value | None = None) -> ir.Value:
            old = kb.load(starts, at, i32)
            kb.store(starts, at, b.add(old, kb.i32(1)) if value is None else value, i32)
            return old

        with kb.loop(0, self.experts + 1) as e:
            kb.store(starts, e, kb.i32(0), i32)
        experts_of_pairs(lambda pair, e: bump(b.add(e, kb.i32(1))))  # counts, shifted by one
        with kb.loop(1, self.experts + 1) as e:  # running sums: starts[e] = pairs of experts before e
            kb.store(starts, e, b.add(kb.load(starts, e, i32), kb.load(starts, b.sub(e, kb.i32(1)), i32)), i32)

        def place(pair: ir.Value, e: ir.Value) -> None:  # starts[e] walks to expert e's end
            kb.store(order, bump(e), pair, i32)
        experts_of_pairs(place)
        with kb.loop(0, self.experts) as j:  # each starts[e] now holds e + 1's start: shift back
            e = b.sub(kb.i32(self.experts), j)
            kb.store(starts, e, kb.load(starts, b.sub(e, kb.i32(1)), i32), i32)
        kb.store(starts, kb.i32(0), kb.i32(0), i32)

    def _expert_pairs(self, kb: KernelBuilder, t0, e, p0, cnt, order, buffers: tuple, n0, rows_here, sums) -> None:
        """The block's rows of expert e for its pairs order[p0:p0 + cnt] (cnt <= HOST_PAIRS):
        code specialised per tile height, the last pair repeated to fill it (not stored):
        banded weights a band at a time (int8 dots, any height), GGUF-form a few rows at a time."""
        b, low = kb.b, 0
        for height in tile_heights(HOST_PAIRS):
            fits = b.and_(b.icmp_signed(">", cnt, kb.i32(low)), b.icmp_signed("<=", cnt, kb.i32(height)))
            with kb.when(fits):
                pairs = [kb.load(order, b.add(p0, kb.imin(kb.i32(j), b.sub(cnt, kb.i32(1)))), DType.I32)
                         for j in range(height)]
                x_rows = pairs if self.per_slot else [b.udiv(p, kb.i32(self.slots)) for p in pairs]
                first = b.mul(e, kb.i32(self.n))
                if self.banded:  # every height: a band of the expert's rows at a time, int8 dots
                    self._band_pairs(kb, t0, pairs, cnt, x_rows, b.add(first, n0), rows_here, buffers, n0, sums)
                else:
                    self._chunk_pairs(kb, t0, pairs, cnt, x_rows, first, rows_here, buffers, n0, sums)
            low = height

    def _chunk_pairs(self, kb: KernelBuilder, t0, pairs: list, cnt, x_rows: list, first, rows_here, buffers: tuple,
                     n0, sums) -> None:
        """The block's rows of an expert (weight rows from `first`) for `pairs` (the first
        cnt stored) in GGUF form, a few rows at a time: a lone pair with the int8 dots
        where the kernel has them, more in floats."""
        b = kb.b
        xbuf, qbuf, sbuf = buffers
        x_offsets = [b.mul(r, kb.i32(self.k)) for r in x_rows]
        chunk = host_rows_per_chunk(len(pairs), self.rows_per_block)
        with kb.loop(0, rows_here, chunk) as c:
            ns = [b.add(b.add(n0, c), kb.i32(r)) for r in range(chunk)]
            rows = [b.add(first, kb.imin(n, kb.i32(self.n - 1))) for n in ns]  # past n: not stored
            if len(pairs) == 1 and self.int8_dots:
                self._pair_rows(kb, t0, pairs[0], c, ns, self._int8_dots(kb, qbuf, sbuf, x_rows[0], rows), sums)
            else:
                accs = self._tile_dots(kb, xbuf, x_offsets, rows)
                for j, pair in enumerate(pairs):
                    with kb.when(b.icmp_signed("<", kb.i32(j), cnt)):
                        self._pair_rows(kb, t0, pair, c, ns, [hsum(kb, acc[j]) for acc in accs], sums)

    def _band_pairs(self, kb: KernelBuilder, t0, pairs: list, cnt, x_rows: list, first, rows_here, buffers: tuple,
                    n0, sums) -> None:
        """The block's rows of an expert (from weight row `first`) for `pairs` (the first
        cnt stored), a band at a time with Gemv's band dots over the pairs' int8 rows."""
        b = kb.b
        _, qbuf, sbuf = buffers
        with kb.loop(0, rows_here, BAND) as c:
            dots = self._band_dots(kb, qbuf, sbuf, x_rows, b.add(first, c))
            ns = [b.add(b.add(n0, c), kb.i32(r)) for r in range(BAND)]
            for j, pair in enumerate(pairs):
                with kb.when(b.icmp_signed("<", kb.i32(j), cnt)):
                    self._pair_rows(kb, t0, pair, c, ns, [b.extract_element(dots[j], kb.i32(r)) for r in range(BAND)],
                                    sums)

    def _pair_rows(self, kb: KernelBuilder, t0, pair, c, ns: list, totals: list, sums) -> None:
        """A pair's outputs ns: stored in its slot's columns, or (combine) weighted into
        its token's sums."""
        b = kb.b
        t, s = b.udiv(pair, kb.i32(self.slots)), b.urem(pair, kb.i32(self.slots))
        if sums is None:
            self._store_rows(kb, b.add(t0, t), s, ns, totals)
            return
        weight = self._route(kb, b.add(t0, t), s)[1]
        base = b.add(b.mul(t, kb.i32(self.rows_per_block)), c)
        for r, (n, total) in enumerate(zip(ns, totals)):
            with kb.when(b.icmp_signed("<", n, kb.i32(self.n))):
                at = b.add(base, kb.i32(r))
                kb.store(sums, at, kb.fadd(kb.load(sums, at, F32), kb.fmul(weight, total)), F32)


# -- patterns -------------------------------------------------------------------------
def moe_route_constraint(m: Match) -> bool:
    """A dense router weight of exactly the rows the routing reads, consistent routing
    attributes, one activation dtype (x, or the add's and norm's values) and one weight
    dtype (router and norm weight), a float32 route."""
    route, add, norm = m["route"], m.get("add"), m.get("norm")
    w, a = m.graph.node(route.inputs[1]), route.attrs
    experts, n_group = a["experts"], a.get("n_group", 1)
    if (w.format or route.type.dtype is not F32 or w.type.shape[0] != experts + a.get("shared_gate", False)
            or experts % n_group or not 1 <= a["top_k"] <= experts or not 1 <= a.get("topk_group", 1) <= n_group):
        return False
    if add is None:
        return True
    acts = {add.type.dtype, norm.type.dtype, *(_dtype(m, i) for i in add.inputs)}
    return len(acts) == 1 and _dtype(m, norm.inputs[1]) == w.type.dtype


def lower_moe_route(m: Match, ctx: LowerContext) -> Launch:
    route, add, norm = m["route"], m.get("add"), m.get("norm")
    w = m.graph.node(route.inputs[1])
    args = {"w": V(w.name), "route": V(route.name), "num_rows": D(_rows(route))}
    outputs = [route.name]
    residual_out = normed_out = False
    if add is not None:
        args |= {"a": V(add.inputs[0]), "b": V(add.inputs[1]), "norm_w": V(norm.inputs[1])}
        residual_out, normed_out = m.escapes("add"), m.escapes("norm")
        for out, name, node in ((residual_out, "residual", add), (normed_out, "normed", norm)):
            if out:
                args[name] = V(node.name)
                outputs.append(node.name)
        act = add.type.dtype
    else:
        args["x"] = V(route.inputs[0])
        act = _dtype(m, route.inputs[0])
    k, rows = w.type.shape[1], w.type.shape[0]
    a = route.attrs
    kernel = MoeRoute(k=k, n=rows, act=act, weight=w.type.dtype, out=F32,
                      prologue="none" if add is None else "add_rms_norm", residual_out=residual_out,
                      eps=norm.attrs["eps"] if norm is not None else 0.0,
                      rows_per_block=min(rows, ROUTER_ROWS_GPU if ctx.target.is_gpu else ROUTER_ROWS_HOST),
                      vec=vector_width(k, act, w.type.dtype) if ctx.gpu_shapes else 1, normed_out=normed_out,
                      experts=a["experts"], top_k=a["top_k"], shared=a.get("shared", 0),
                      shared_gate=a.get("shared_gate", False), renormalize=a.get("renormalize", False),
                      scaling=a.get("scaling", 1.0), n_group=a.get("n_group", 1), topk_group=a.get("topk_group", 1))
    return ctx.kernel_launch(m, kernel, args, tuple(outputs), {"num_rows": _rows(route)})


def _moe_shape(m: Match) -> tuple[int, int, bool]:
    """(K, N per expert, per_slot) of the match's moe_matmul."""
    moe = m["moe"]
    k = m.graph.node(moe.inputs[2]).type.shape[1]
    n = moe.type.shape[1] // (1 if moe.attrs.get("combine", False) else moe.attrs["slots"])
    return k, n, m.graph.node(moe.inputs[0]).type.shape[1] != k


def moe_gemv_constraint(m: Match) -> bool:
    """Shapes that agree with the attributes, whole blocks of a weight format, a float32
    route, one activation dtype, and an activation grouped one group a part of x (the
    slots' parts, or one shared row)."""
    moe, act = m["moe"], m.get("act")
    x, route, w = (m.graph.node(i) for i in moe.inputs)
    slots, experts = moe.attrs["slots"], moe.attrs["experts"]
    k, n, per_slot = _moe_shape(m)
    if (w.type.shape[0] != experts * n or x.type.shape[1] not in (k, slots * k) or route.type.dtype is not F32
            or route.type.shape[1] != 2 * slots or (w.format and k % FORMATS[w.format].block)):
        return False
    if act is None:
        return True
    return (act.attrs.get("groups", 1) == (slots if per_slot else 1)
            and act.type.dtype == _dtype(m, act.inputs[0]))


def lower_moe_gemv(m: Match, ctx: LowerContext) -> Launch:
    """A MoeGemv launch for the match (roles "moe" and optionally "act"), for any T."""
    moe, act = m["moe"], m.get("act")
    x, route, w = moe.inputs
    weight = m.graph.node(w)
    slots, combine = moe.attrs["slots"], moe.attrs.get("combine", False)
    k, n, per_slot = _moe_shape(m)
    src = x if act is None else act.inputs[0]
    act_dtype = _dtype(m, src)
    if ctx.target.is_gpu:  # output blocks go on grid y: very wide outputs take more rows a block
        rows = 4
        while (1 if combine else slots) * cdiv(n, rows) > GRID_Y:
            rows *= 2
    else:
        rows = HOST_EXPERT_ROWS
    host_tiles = not ctx.target.is_gpu and not ctx.gpu_shapes
    # host: as many tokens a tile as fit HOST_TILE_FLOATS of prologue rows, up to HOST_TILE_TOKENS
    tokens = max(1, min(HOST_TILE_TOKENS, HOST_TILE_FLOATS // ((slots if per_slot else 1) * k))) if host_tiles else 1
    kernel = MoeGemv(k=k, n=n, act=act_dtype, weight=weight.type.dtype, out=moe.type.dtype,
                     prologue="none" if act is None else act.kind, rows_per_block=rows,
                     vec=vector_width(k, act_dtype, weight.type.dtype) if ctx.gpu_shapes else 1,
                     weight_format=weight.format, experts=moe.attrs["experts"], slots=slots, combine=combine,
                     per_slot=per_slot, host_tiles=host_tiles, tokens_per_block=tokens,
                     int8_dots=host_tiles and takes_int8_dots(weight.format, ctx.int8_activations))
    args = {"x" if act is None else "gu": V(src), "route": V(route), "w": V(w), "y": V(moe.name),
            "num_rows": D(_rows(moe))}
    return ctx.kernel_launch(m, kernel, args, (moe.name,), {"num_rows": _rows(moe)})


def lower_moe_gemm(m: Match, ctx: LowerContext) -> Launch:
    """A batch's routed experts: on the host grouped GEMMs (the executor's "moe_gemm"
    launch: tokens gathered by expert, each expert's matrix read once for all of its
    tokens), on a GPU the expert GEMV kernel."""
    if ctx.target.is_gpu:
        return lower_moe_gemv(m, ctx)
    moe = m["moe"]
    return Launch(name=moe.name, pattern=m.pattern.name, nodes=(), kind="moe_gemm",
                  args=tuple(V(i) for i in moe.inputs), outputs=(moe.name,))


def _act_moe(kind: str) -> tuple[PNode, ...]:
    return PNode("act", kind), PNode("moe", "moe_matmul", (("act", 0),))


def moe_patterns() -> list[Pattern]:
    """The router in both buckets; the expert GEMVs (only routed experts' rows read) in
    the gemv bucket; in the gemm bucket the host groups a batch's tokens by expert into
    GEMMs, a GPU runs the expert GEMV (its fused prologues are decode's)."""
    return [
        Pattern("add_rms_norm_moe_route", 57, (ADD, NORM_AFTER_ADD, PNode("route", "moe_route", (("norm", 0),))),
                lower_moe_route, escapes=frozenset({"add", "norm"}), constraint=moe_route_constraint,
                doc="residual add + RMSNorm + router GEMV, softmax, top-k (the sum and the normed row written)"),
        Pattern("moe_route", 25, (PNode("route", "moe_route"),), lower_moe_route, constraint=moe_route_constraint,
                doc="router GEMV + softmax + top-k + shared slots"),
        Pattern("silu_mul_moe_gemv", 40, _act_moe("silu_mul"), lower_moe_gemv, buckets=("gemv",),
                constraint=moe_gemv_constraint,
                doc="each slot's SiLU(gate) * up + its expert's down GEMV (+ the slots' weighted sum)"),
        Pattern("gelu_tanh_mul_moe_gemv", 40, _act_moe("gelu_tanh_mul"), lower_moe_gemv, buckets=("gemv",),
                constraint=moe_gemv_constraint,
                doc="each slot's GELU-tanh(gate) * up + its expert's down GEMV (+ the slots' weighted sum)"),
        Pattern("moe_gemm", 45, (PNode("moe", "moe_matmul"),), lower_moe_gemm, buckets=("gemm",),
                constraint=moe_gemv_constraint,
                doc="a batch's routed experts as grouped GEMMs on the host (tokens gathered by expert)"),
        Pattern("moe_gemv", 20, (PNode("moe", "moe_matmul"),), lower_moe_gemv, buckets=("gemv",),
                constraint=moe_gemv_constraint,
                doc="each slot's expert GEMV (gate|up), only the routed experts' rows read"),
    ]
