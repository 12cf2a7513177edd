"""Multi-head latent attention (DeepSeek-V2) kernels and their patterns.

One MLA layer (models/deepseek_v2.py) and its launches, no q_lora (V2-Lite):
    a      = matmul(xn, w_qkv)                      [add_]rms_norm_gemv, or a library GEMM
    latent = rms_norm(slice(a)); k_pe = rope(slice(a))            \\
    q_pe   = rope(slice(a)); cache = latent_write(latent, k_pe)   /  latent_q_rope_write
    q_lat  = head_matmul(slice(a), w_uk)               slice_head_gemv
    o_lat  = mla_attention(q_lat, q_pe, cache)         mla_paged_attention
    o_v    = head_matmul(o_lat, w_uv)                  head_gemv
With a q_lora latent (V2) q comes from a GEMV of its own: slice_rms_norm makes q_a from
a's first columns, latent_rope_write covers the latent and k_pe, slice_rope q's rope
part. The slices fold into their consumers as static column offsets and row strides;
`slice` alone is the fallback for any left over.

HeadGemv: one body for both targets, correct for any lane count. A block owns a tile
of token rows and `rows_per_block` output rows; `split` lanes share each output row's
dot (consecutive lanes read consecutive pieces of the weight row), each weight piece
read once for the tile's tokens; the partial sums meet in block-shared memory. The
host takes one lane per row (split 1) and tiles of 8 tokens; the GPU (gpu_shapes)
splits a row over up to 32 lanes with 16-byte loads.

MlaPagedAttention: one block per (token, group of query heads): every head of the
group scores each cached row [latent | k_pe] against its [q_latent | q_pe], read once
a group (the latent cache has one "KV head" shared by all). GPU: tiles of `lanes` keys,
a key per lane for the scores, online softmax per head, then lanes switch to latent
dims: each lane keeps its dims' running outputs for every head in registers across
tiles. Host: as kernels/attention.py's host path (tiles of HOST_KEYS, outputs in a
block array, loops over dims with constant trip counts that vectorise).

Everything read through metadata (positions, slots, sequence bounds, block tables) is
clamped into its buffer first, so corrupt input never reads or writes out of bounds.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Mapping

from llvmlite import ir

from fusec.fusion.codegen.builder import KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Node
from fusec.fusion.patterns import Match, Pattern, PNode
from fusec.fusion.plan import Arg, Launch, LowerContext
from fusec.kernels.attention import HOST_KEYS, MAX_HEADS_PER_BLOCK, online_softmax
from fusec.kernels.base import GPU_LANES, Kernel, cdiv, round_to, row_offset
from fusec.kernels.elementwise import RowKernel
from fusec.kernels.gemv import tile_heights, vector_width
from fusec.kernels.registry import HOST_ROWS_PER_BLOCK, HOST_TOKENS_PER_BLOCK, D, V, _dtype, _rows, same_act_dtype
from fusec.kernels.rope_kv import cos_sin_table

F32, I32 = DType.F32, DType.I32
GRID_Y = 65535  # CUDA's limit on grid y (output blocks)
GPU_TOKENS_PER_BLOCK = 8  # token rows a GPU head GEMV block takes in the gemm bucket (weights read once a tile)
MAX_ROW_SPLIT = 32  # most lanes sharing one output row's dot (a warp)
SHARED_BUDGET = 32 * 1024  # bytes of block-shared arrays an attention block may use (48 KiB static at most)

Loader = Callable[[ir.Value], ir.Value]
Storer = Callable[[ir.Value, ir.Value], None]


# -- shared pieces ---------------------------------------------------------------------
def table_row(kb: KernelBuilder, t: ir.Value, rot_half: int, rows: int) -> ir.Value:
    """Offset of token t's cos | sin row in the table, its position clamped into the table."""
    pos = kb.imax(kb.imin(kb.load(kb["positions"], t, I32), kb.i32(rows - 1)), kb.i32(0))
    return row_offset(kb, pos, 2 * rot_half)


def rope_heads(kb: KernelBuilder, heads: int, head_dim: int, rot_half: int, interleaved: bool, cs_row: ir.Value,
               load: Loader, store: Storer) -> None:
    """Rotate `heads` heads (ops.rope): load(col) reads column col = h * head_dim + d of
    the heads' row, store(col, v) writes the result. Lanes take the rotated pairs, then
    the dims past the rotary ones, which pass through."""
    b = kb.b
    with kb.lane_loop(heads * rot_half) as i:
        j = b.srem(i, kb.i32(rot_half))
        head = b.mul(b.sdiv(i, kb.i32(rot_half)), kb.i32(head_dim))
        # the pair's two dims: (j, j + rot_half), or interleaved (2j, 2j + 1)
        d1 = b.add(head, b.mul(j, kb.i32(2)) if interleaved else j)
        d2 = b.add(d1, kb.i32(1 if interleaved else rot_half))
        x1, x2 = load(d1), load(d2)
        c = kb.load(kb["cos_sin"], b.add(cs_row, kb.wide(j)), F32)
        s = kb.load(kb["cos_sin"], b.add(cs_row, kb.wide(b.add(j, kb.i32(rot_half)))), F32)
        store(d1, b.fsub(b.fmul(x1, c), b.fmul(x2, s)))
        store(d2, b.fadd(b.fmul(x2, c), b.fmul(x1, s)))
    passed = head_dim - 2 * rot_half
    if passed:
        with kb.lane_loop(heads * passed) as i:
            col = b.add(b.mul(b.sdiv(i, kb.i32(passed)), kb.i32(head_dim)),
                        b.add(b.srem(i, kb.i32(passed)), kb.i32(2 * rot_half)))
            store(col, load(col))


def rms_scale(kb: KernelBuilder, width: int, eps: float, load: Loader) -> ir.Value:
    """1 / rms of the `width` values load(i) (a block reduction)."""
    b = kb.b
    total = kb.var(kb.f32(0.0))
    with kb.lane_loop(width) as i:
        x = load(i)
        total.set(kb.fadd(total.get(), kb.fmul(x, x)))
    return b.fdiv(kb.f32(1.0), kb.sqrt(b.fadd(b.fdiv(kb.reduce(total.get()), kb.f32(width)), kb.f32(eps))))


def loads(kb: KernelBuilder, ptr: ir.Value, at: ir.Value, dtype: DType, vec: int) -> list[ir.Value]:
    """vec consecutive elements from at (a multiple of vec), as floats."""
    return kb.load_vector(ptr, at, dtype, vec) if vec > 1 else [kb.load(ptr, at, dtype)]


def columns(kb: KernelBuilder, name: str, row: ir.Value, offset: int, dtype: DType) -> Loader:
    """Column offset + i of the row starting at element `row` of `name`."""
    b = kb.b
    return lambda i: kb.load(kb[name], b.add(row, kb.wide(b.add(i, kb.i32(offset)))), dtype)


# -- latent (+ q_pe) RoPE and the cache write ---------------------------------------------
@dataclass(frozen=True)
class LatentRopeWrite(Kernel):
    """One block per token of the source row a (the fused down-projection's output):
    latent = rms_norm(a[c_offset:c_offset + rank]) * norm_w and k_pe = rope(a[kpe_offset:
    kpe_offset + rope_dim]) into the token's cache slot as [latent | k_pe]; with q_heads,
    also the q_heads rope heads at q_offset rotated into q_out."""

    family = "latent_rope_write"
    cols: int  # the source row's width
    c_offset: int
    rank: int
    kpe_offset: int
    rope_dim: int  # head_dim of the rope heads (k_pe is one)
    rot_half: int  # rotated pairs a head (partial rotary: fewer than rope_dim / 2)
    interleaved: bool
    act: DType
    norm_weight: DType
    eps: float
    block_size: int
    table_rows: int  # positions in the cos | sin table
    q_heads: int = 0
    q_offset: int = 0

    def params(self) -> list[Param]:
        names = ("src", "positions", "cos_sin", "slots", "norm_w", "cache") + (("q_out",) if self.q_heads else ())
        return [Param(n, "ptr") for n in names] + [Param("num_tokens", "i32"), Param("num_blocks", "i32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return dims["num_tokens"], 1

    def body(self, kb: KernelBuilder) -> None:
        b, t = kb.b, kb.block_id(0)
        row = row_offset(kb, t, self.cols)
        cs_row = table_row(kb, t, self.rot_half, self.table_rows)
        rope = dict(head_dim=self.rope_dim, rot_half=self.rot_half, interleaved=self.interleaved, cs_row=cs_row)
        if self.q_heads:
            q_row = row_offset(kb, t, self.q_heads * self.rope_dim)
            rope_heads(kb, self.q_heads, load=columns(kb, "src", row, self.q_offset, self.act),
                       store=lambda col, v: kb.store(kb["q_out"], b.add(q_row, kb.wide(col)), v, self.act), **rope)
        slot = kb.wide(kb.load(kb["slots"], t, I32))
        capacity = b.mul(kb.wide(kb["num_blocks"]), kb.i64(self.block_size))
        # negative: padding; past the cache: corrupt. Either writes nothing.
        with kb.when(b.and_(b.icmp_signed(">=", slot, kb.i64(0)), b.icmp_signed("<", slot, capacity))):
            dst = b.mul(slot, kb.i64(self.rank + self.rope_dim))
            latent = columns(kb, "src", row, self.c_offset, self.act)
            inv = rms_scale(kb, self.rank, self.eps, latent)
            with kb.lane_loop(self.rank) as i:
                v = b.fmul(b.fmul(latent(i), inv), kb.load(kb["norm_w"], i, self.norm_weight))
                kb.store(kb["cache"], b.add(dst, kb.wide(i)), v, self.act)
            k_dst = b.add(dst, kb.i64(self.rank))
            rope_heads(kb, 1, load=columns(kb, "src", row, self.kpe_offset, self.act),
                       store=lambda col, v: kb.store(kb["cache"], b.add(k_dst, kb.wide(col)), v, self.act), **rope)


@dataclass(frozen=True)
class SliceRope(Kernel):
    """y[t] = rope(x[t, offset:offset + n_heads * head_dim]): one block per token."""

    family = "slice_rope"
    cols: int
    offset: int
    n_heads: int
    head_dim: int
    rot_half: int
    interleaved: bool
    act: DType
    table_rows: int

    def params(self) -> list[Param]:
        return [Param(n, "ptr") for n in ("x", "positions", "cos_sin", "y")] + [Param("num_tokens", "i32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return dims["num_tokens"], 1

    def body(self, kb: KernelBuilder) -> None:
        b, t = kb.b, kb.block_id(0)
        y_row = row_offset(kb, t, self.n_heads * self.head_dim)
        rope_heads(kb, self.n_heads, self.head_dim, self.rot_half, self.interleaved,
                   table_row(kb, t, self.rot_half, self.table_rows),
                   columns(kb, "x", row_offset(kb, t, self.cols), self.offset, self.act),
                   lambda col, v: kb.store(kb["y"], b.add(y_row, kb.wide(col)), v, self.act))


@dataclass(frozen=True)
class SliceRow(RowKernel):
    """y[r] = x[r, start:start + width], or with `norm` its rms_norm (times norm_w)."""

    family = "slice_row"
    cols: int
    start: int
    width: int
    act: DType
    norm: bool = False
    weight: DType = F32  # norm_w's dtype
    eps: float = 0.0

    def params(self) -> list[Param]:
        return self._params("x", *(("norm_w",) if self.norm else ()), "y")

    def body(self, kb: KernelBuilder) -> None:
        b, r = kb.b, kb.block_id(0)
        x = columns(kb, "x", row_offset(kb, r, self.cols), self.start, self.act)
        dst = row_offset(kb, r, self.width)
        inv = rms_scale(kb, self.width, self.eps, x) if self.norm else None
        with kb.lane_loop(self.width) as i:
            v = x(i) if inv is None else b.fmul(b.fmul(x(i), inv), kb.load(kb["norm_w"], i, self.weight))
            kb.store(kb["y"], b.add(dst, kb.wide(i)), v, self.act)


# -- per-head GEMV -------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadGemv(Kernel):
    """y[t, h * n + j] = x[t, x_offset + h * k : ... + k] . w[h * n + j] (ops.head_matmul),
    x read from a row of x_cols columns (a slice folds in as x_offset)."""

    family = "head_gemv"
    heads: int
    k: int
    n: int  # output rows a head
    x_cols: int
    x_offset: int
    act: DType
    weight: DType
    out: DType
    rows_per_block: int
    split: int = 1  # lanes a row's dot is split over
    vec: int = 1  # elements per load (k, x_cols and x_offset divide)
    tokens_per_block: int = 1

    def params(self) -> list[Param]:
        return [Param(n, "ptr") for n in ("x", "w", "y")] + [Param("num_rows", "i32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return cdiv(dims["num_rows"], self.tokens_per_block), cdiv(self.heads * self.n, self.rows_per_block)

    def body(self, kb: KernelBuilder) -> None:
        b, tpb, rows, split = kb.b, self.tokens_per_block, self.rows_per_block, self.split
        t0 = b.mul(kb.block_id(0), kb.i32(tpb))
        count = kb.imin(kb.i32(tpb), b.sub(kb["num_rows"], t0))  # the last tile may be short
        n0 = b.mul(kb.block_id(1), kb.i32(rows))
        part = kb.shared(tpb * rows * split, "part")  # [token, row, piece] partial sums
        low = 0
        for height in tile_heights(tpb):  # code specialised per height: accumulators stay in registers
            with kb.when(b.and_(b.icmp_signed(">", count, kb.i32(low)), b.icmp_signed("<=", count, kb.i32(height)))):
                # rows past the tile's end repeat its last row and are not stored
                last = b.sub(count, kb.i32(1))
                self._partials(kb, t0, [kb.imin(kb.i32(t), last) for t in range(height)], n0, part)
            low = height
        kb.barrier()
        total_rows = self.heads * self.n
        with kb.lane_loop(tpb * rows) as o:
            t, n = b.sdiv(o, kb.i32(rows)), b.add(n0, b.srem(o, kb.i32(rows)))
            with kb.when(b.and_(b.icmp_signed("<", t, count), b.icmp_signed("<", n, kb.i32(total_rows)))):
                total = kb.var(kb.f32(0.0))
                with kb.loop(0, split) as c:
                    total.set(kb.fadd(total.get(), kb.load(part, b.add(b.mul(o, kb.i32(split)), c), F32)))
                kb.store(kb["y"], b.add(row_offset(kb, b.add(t0, t), total_rows), kb.wide(n)),
                         round_to(kb, total.get(), self.out), self.out)

    def _partials(self, kb: KernelBuilder, t0: ir.Value, tokens: list[ir.Value], n0: ir.Value, part: ir.Value) -> None:
        """part[(t, row, piece)] for the tile rows `tokens`: each (row, piece) pair a lane."""
        b, vec, split, rows = kb.b, self.vec, self.split, self.rows_per_block
        with kb.lane_loop(rows * split) as pair:
            j, c = b.sdiv(pair, kb.i32(split)), b.srem(pair, kb.i32(split))
            row = kb.imin(b.add(n0, j), kb.i32(self.heads * self.n - 1))  # past the end: in bounds, not stored
            w_row = row_offset(kb, row, self.k)
            x_col = kb.wide(b.add(b.mul(b.sdiv(row, kb.i32(self.n)), kb.i32(self.k)), kb.i32(self.x_offset)))
            x_rows = [b.add(row_offset(kb, b.add(t0, t), self.x_cols), x_col) for t in tokens]
            accs = [kb.var(kb.f32(0.0)) for _ in tokens]
            with kb.loop(b.mul(c, kb.i32(vec)), self.k, split * vec) as i:
                ws = loads(kb, kb["w"], b.add(w_row, kb.wide(i)), self.weight, vec)
                for acc, x_row in zip(accs, x_rows):
                    total = acc.get()
                    for x, w in zip(loads(kb, kb["x"], b.add(x_row, kb.wide(i)), self.act, vec), ws):
                        total = kb.fadd(total, kb.fmul(x, w))
                    acc.set(total)
            for t, acc in enumerate(accs):
                kb.store(part, b.add(b.mul(b.add(kb.i32(t * rows), j), kb.i32(split)), c), acc.get(), F32)


# -- attention over the latent cache ---------------------------------------------------------
@dataclass(frozen=True)
class MlaPagedAttention(Kernel):
    """ops.mla_attention: causal attention of the new tokens over the paged latent cache
    [1, NB, block_size, 1, rank + rope_dim], output [T, n_heads * rank]."""

    family = "mla_paged_attention"
    n_heads: int
    rank: int
    rope_dim: int
    block_size: int
    scale: float
    act: DType
    heads_per_block: int
    vec: int = 1  # elements per cached-row load on the GPU (rank + rope_dim divides)

    @property
    def width(self) -> int:
        return self.rank + self.rope_dim

    def params(self) -> list[Param]:
        return [Param(n, "ptr") for n in ("q_latent", "q_pe", "cache", "block_tables", "context_lens",
                                           "query_start_loc", "out")] \
            + [Param(n, "i32") for n in ("num_seqs", "table_width", "num_blocks")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return dims["num_tokens"], self.n_heads // self.heads_per_block

    def body(self, kb: KernelBuilder) -> None:
        b, bs, w, r, dr = kb.b, self.block_size, self.width, self.rank, self.rope_dim
        group = self.heads_per_block
        t = kb.block_id(0)
        first_head = b.mul(kb.block_id(1), kb.i32(group))
        seq = kb.var(kb.i32(0))  # which sequence owns token t
        with kb.loop(0, kb["num_seqs"]) as s:
            with kb.when(b.icmp_signed("<=", kb.load(kb["query_start_loc"], s, I32), t)):
                seq.set(s)
        s = seq.get()
        first = kb.load(kb["query_start_loc"], s, I32)
        n_new = b.sub(kb.load(kb["query_start_loc"], b.add(s, kb.i32(1)), I32), first)
        # keys 0..hi-1, hi clamped into the sequence's table
        ctx = kb.imax(kb.imin(kb.load(kb["context_lens"], s, I32), b.mul(kb["table_width"], kb.i32(bs))), kb.i32(0))
        hi = kb.imax(kb.imin(b.add(b.sub(ctx, n_new), b.add(b.sub(t, first), kb.i32(1))), ctx), kb.i32(0))
        table = b.mul(kb.wide(s), kb.wide(kb["table_width"]))
        last_block = b.sub(kb["num_blocks"], kb.i32(1))

        def key_row(j: ir.Value) -> ir.Value:  # element offset of cached row j of the sequence
            blk = kb.load(kb["block_tables"], b.add(table, kb.wide(b.sdiv(j, kb.i32(bs)))), I32)
            blk = kb.imax(kb.imin(blk, last_block), kb.i32(0))
            slot = b.add(b.mul(kb.wide(blk), kb.i64(bs)), kb.wide(b.srem(j, kb.i32(bs))))
            return b.mul(slot, kb.i64(w))

        # the group's [q_latent | q_pe] rows, times the scale
        q_sh = kb.shared(group * w, "q")
        for src, cols, at in (("q_latent", r, 0), ("q_pe", dr, r)):
            row = b.add(row_offset(kb, t, self.n_heads * cols), b.mul(kb.wide(first_head), kb.i64(cols)))
            with kb.lane_loop(group * cols) as i:
                g, d = b.sdiv(i, kb.i32(cols)), b.srem(i, kb.i32(cols))
                q = kb.load(kb[src], b.add(row, kb.wide(i)), self.act)
                kb.store(q_sh, b.add(b.mul(g, kb.i32(w)), b.add(d, kb.i32(at))), b.fmul(q, kb.f32(self.scale)), F32)
        kb.barrier()
        out_row = b.add(row_offset(kb, t, self.n_heads * r), b.mul(kb.wide(first_head), kb.i64(r)))
        (self._gpu if kb.target.is_gpu else self._host)(kb, hi, key_row, q_sh, out_row)

    def _host(self, kb: KernelBuilder, hi: ir.Value, key_row, q_sh: ir.Value, out_row: ir.Value) -> None:
        """Keys in tiles of HOST_KEYS: the tile's scores for every head, each head's softmax
        state updated once a tile, then p * latent added key by key."""
        b, w, r, group, tile = kb.b, self.width, self.rank, self.heads_per_block, HOST_KEYS
        p_sh = kb.shared(group * tile, "p")  # scores, then probabilities, of the tile's keys
        acc_sh = kb.shared(group * r, "acc")
        with kb.loop(0, group * r) as i:
            kb.store(acc_sh, i, kb.f32(0.0), F32)
        ms = [kb.var(kb.f32(-math.inf)) for _ in range(group)]
        sums = [kb.var(kb.f32(0.0)) for _ in range(group)]
        with kb.loop(0, hi, tile) as j0:
            count = kb.imin(b.sub(hi, j0), kb.i32(tile))
            with kb.loop(0, count) as jj:
                base = key_row(b.add(j0, jj))
                for g in range(group):
                    dot = kb.var(kb.f32(0.0))
                    with kb.loop(0, w) as d:
                        c = kb.load(kb["cache"], b.add(base, kb.wide(d)), self.act)
                        dot.set(kb.fadd(dot.get(), kb.fmul(kb.load(q_sh, b.add(d, kb.i32(g * w)), F32), c)))
                    kb.store(p_sh, b.add(jj, kb.i32(g * tile)), dot.get(), F32)
            for g in range(group):
                top = kb.var(ms[g].get())
                with kb.loop(0, count) as jj:
                    top.set(kb.fmax(top.get(), kb.load(p_sh, b.add(jj, kb.i32(g * tile)), F32)))
                m_new = top.get()
                alpha = kb.exp(b.fsub(ms[g].get(), m_new))
                total = kb.var(kb.f32(0.0))
                with kb.loop(0, count) as jj:
                    at = b.add(jj, kb.i32(g * tile))
                    p = kb.exp(b.fsub(kb.load(p_sh, at, F32), m_new))
                    kb.store(p_sh, at, p, F32)
                    total.set(kb.fadd(total.get(), p))
                sums[g].set(b.fadd(b.fmul(sums[g].get(), alpha), total.get()))
                ms[g].set(m_new)
                with kb.loop(0, r) as d:
                    at = b.add(d, kb.i32(g * r))
                    kb.store(acc_sh, at, b.fmul(kb.load(acc_sh, at, F32), alpha), F32)
            with kb.loop(0, count) as jj:
                base = key_row(b.add(j0, jj))
                for g in range(group):
                    p = kb.load(p_sh, b.add(jj, kb.i32(g * tile)), F32)
                    with kb.loop(0, r) as d:
                        at = b.add(d, kb.i32(g * r))
                        v = kb.load(kb["cache"], b.add(base, kb.wide(d)), self.act)
                        kb.store(acc_sh, at, kb.fadd(kb.load(acc_sh, at, F32), kb.fmul(p, v)), F32)
        for g in range(group):
            inv = b.fdiv(kb.f32(1.0), sums[g].get())
            with kb.loop(0, r) as d:
                v = b.fmul(kb.load(acc_sh, b.add(d, kb.i32(g * r)), F32), inv)
                kb.store(kb["out"], b.add(out_row, kb.wide(b.add(d, kb.i32(g * r)))), round_to(kb, v, self.act),
                         self.act)

    def _gpu(self, kb: KernelBuilder, hi: ir.Value, key_row, q_sh: ir.Value, out_row: ir.Value) -> None:
        """Keys in tiles of `lanes`, a key per lane for the scores; lane l owns latent dims
        l, l + lanes, ..., their running outputs for every head in registers."""
        b, w, r, group, vec = kb.b, self.width, self.rank, self.heads_per_block, self.vec
        lanes = self.lanes(kb.target)
        lane = kb.lane()
        p_sh = kb.shared(group * lanes, "p")
        ms = [kb.var(kb.f32(-math.inf)) for _ in range(group)]
        sums = [kb.var(kb.f32(0.0)) for _ in range(group)]
        dims = [b.add(lane, kb.i32(i * lanes)) for i in range(cdiv(r, lanes))]
        # a lane's dims past the latent (r not a multiple of lanes) read its last dim, are never stored
        reads = [kb.imin(d, kb.i32(r - 1)) if (i + 1) * lanes > r else d for i, d in enumerate(dims)]
        accs = [[kb.var(kb.f32(0.0)) for _ in dims] for _ in range(group)]
        with kb.loop(0, hi, lanes) as j0:
            j = b.add(j0, lane)
            valid = b.icmp_signed("<", j, hi)
            scores = [kb.var(kb.f32(-math.inf)) for _ in range(group)]
            with kb.when(valid):
                base = key_row(j)
                dots = [kb.var(kb.f32(0.0)) for _ in range(group)]
                with kb.loop(0, w, vec) as d:
                    ks = loads(kb, kb["cache"], b.add(base, kb.wide(d)), self.act, vec)
                    for g, dot in enumerate(dots):
                        total = dot.get()
                        for q, k in zip(loads(kb, q_sh, b.add(d, kb.i32(g * w)), F32, vec), ks):
                            total = kb.fadd(total, kb.fmul(q, k))
                        dot.set(total)
                for score, dot in zip(scores, dots):
                    score.set(dot.get())
            ps, alphas = online_softmax(kb, ms, sums, scores, valid)
            kb.barrier()  # the previous tile's probabilities are read
            for g, p in enumerate(ps):
                kb.store(p_sh, b.add(lane, kb.i32(g * lanes)), p, F32)
            kb.barrier()
            for g, alpha in enumerate(alphas):
                for acc in accs[g]:
                    acc.set(b.fmul(acc.get(), alpha))
            with kb.loop(0, kb.imin(b.sub(hi, j0), kb.i32(lanes))) as jj:
                base = key_row(b.add(j0, jj))
                vs = [kb.load(kb["cache"], b.add(base, kb.wide(d)), self.act) for d in reads]
                for g in range(group):
                    p = kb.load(p_sh, b.add(jj, kb.i32(g * lanes)), F32)
                    for acc, v in zip(accs[g], vs):
                        acc.set(kb.fadd(acc.get(), kb.fmul(p, v)))
        for g in range(group):
            inv = b.fdiv(kb.f32(1.0), sums[g].get())
            for i, (d, acc) in enumerate(zip(dims, accs[g])):
                at = b.add(out_row, kb.wide(b.add(d, kb.i32(g * r))))
                v = round_to(kb, b.fmul(acc.get(), inv), self.act)
                if (i + 1) * lanes > r:
                    with kb.when(b.icmp_signed("<", d, kb.i32(r))):
                        kb.store(kb["out"], at, v, self.act)
                else:
                    kb.store(kb["out"], at, v, self.act)


def mla_heads_per_block(n_heads: int, width: int) -> int:
    """The largest divisor of n_heads up to MAX_HEADS_PER_BLOCK whose block arrays (the
    heads' query rows and a tile's probabilities) fit SHARED_BUDGET."""
    fits = [d for d in range(1, min(n_heads, MAX_HEADS_PER_BLOCK) + 1)
            if n_heads % d == 0 and 4 * d * (width + max(GPU_LANES, HOST_KEYS)) <= SHARED_BUDGET]
    return max(fits, default=1)


# -- lowering ------------------------------------------------------------------------------
def _cos_sin(ctx: LowerContext, rope: Node) -> str:
    """The plan constant holding rope's cos | sin table (shared with lower_rope_kv's)."""
    inv_freq, scale = rope.attrs["inv_freq"], rope.attrs.get("scale", 1.0)
    name = f"cos_sin_{hashlib.sha256(repr((inv_freq, scale, ctx.max_positions)).encode()).hexdigest()[:12]}"
    if name not in ctx.constants:
        ctx.constants[name] = cos_sin_table(inv_freq, ctx.max_positions, scale)
    return name


def _width(node: Node) -> int:
    return node.type.shape[1]


def _state_blocks(cache: Node) -> str:
    """The cache's block-count dim (NB), for the kernels' bounds."""
    dim = cache.type.shape[1]
    assert isinstance(dim, str), f"{cache.name}: the block count must be a symbolic dim"
    return dim


def _same_rope(a: Node, b: Node) -> bool:
    return (a.inputs[1] == b.inputs[1] and a.attrs["head_dim"] == b.attrs["head_dim"]
            and a.attrs["inv_freq"] == b.attrs["inv_freq"] and a.attrs.get("scale", 1.0) == b.attrs.get("scale", 1.0)
            and a.attrs.get("interleaved", False) == b.attrs.get("interleaved", False))


def latent_write_constraint(m: Match) -> bool:
    """Slices of one source; k_pe one rope head and the cache [1, NB, bs, 1, rank + rope];
    q's rope (if in the group) a slice of the same source turned as k_pe is; one
    activation dtype (the norm weight's aside)."""
    c, kpe, norm, kr, lw = (m[r] for r in ("c", "kpe", "norm", "k_rope", "latent_write"))
    src = c.inputs[0]
    cache = m.graph.node(lw.inputs[2])
    shape = cache.type.shape
    nodes = [m.graph.node(src), cache, *m.roles.values()]
    if not (kpe.inputs[0] == src and kr.attrs["n_heads"] == 1 and kr.attrs["head_dim"] == _width(kr)
            and shape[0] == 1 and shape[3] == 1 and shape[4] == _width(norm) + _width(kr)
            and len({n.type.dtype for n in nodes}) == 1):
        return False
    q, qr = m.get("q"), m.get("q_rope")
    return q is None or (q.inputs[0] == src and _same_rope(qr, kr)
                         and qr.attrs["n_heads"] * qr.attrs["head_dim"] == _width(qr))


def lower_latent_write(m: Match, ctx: LowerContext) -> Launch:
    c, kpe, norm, kr, lw = (m[r] for r in ("c", "kpe", "norm", "k_rope", "latent_write"))
    q, qr = m.get("q"), m.get("q_rope")
    src, cache = c.inputs[0], m.graph.node(lw.inputs[2])
    kernel = LatentRopeWrite(cols=_width(m.graph.node(src)), c_offset=c.attrs["start"], rank=_width(norm),
                             kpe_offset=kpe.attrs["start"], rope_dim=kr.attrs["head_dim"],
                             rot_half=len(kr.attrs["inv_freq"]), interleaved=kr.attrs.get("interleaved", False),
                             act=lw.type.dtype, norm_weight=_dtype(m, norm.inputs[1]), eps=norm.attrs["eps"],
                             block_size=cache.type.shape[2], table_rows=ctx.max_positions,
                             q_heads=qr.attrs["n_heads"] if qr else 0, q_offset=q.attrs["start"] if q else 0)
    args = {"src": V(src), "positions": V(kr.inputs[1]), "cos_sin": Arg("const", _cos_sin(ctx, kr)),
            "slots": V(lw.inputs[3]), "norm_w": V(norm.inputs[1]), "cache": Arg("k_cache", cache.name),
            "num_tokens": D(_rows(norm)), "num_blocks": D(_state_blocks(cache))}
    outputs = (lw.name,)
    if qr is not None:
        args["q_out"] = V(qr.name)
        outputs = (qr.name, lw.name)
    return ctx.kernel_launch(m, kernel, args, outputs, {"num_tokens": _rows(norm)})


def slice_rope_constraint(m: Match) -> bool:
    rope = m["rope"]
    return rope.attrs["n_heads"] * rope.attrs["head_dim"] == _width(rope) and same_act_dtype(m)


def lower_slice_rope(m: Match, ctx: LowerContext) -> Launch:
    sl, rope = m["slice"], m["rope"]
    kernel = SliceRope(cols=_width(m.graph.node(sl.inputs[0])), offset=sl.attrs["start"],
                       n_heads=rope.attrs["n_heads"], head_dim=rope.attrs["head_dim"],
                       rot_half=len(rope.attrs["inv_freq"]), interleaved=rope.attrs.get("interleaved", False),
                       act=rope.type.dtype, table_rows=ctx.max_positions)
    args = {"x": V(sl.inputs[0]), "positions": V(rope.inputs[1]), "cos_sin": Arg("const", _cos_sin(ctx, rope)),
            "y": V(rope.name), "num_tokens": D(_rows(rope))}
    return ctx.kernel_launch(m, kernel, args, (rope.name,), {"num_tokens": _rows(rope)})


def lower_slice_row(m: Match, ctx: LowerContext) -> Launch:
    sl, norm = m["slice"], m.get("norm")
    out = norm or sl
    norm_attrs = {} if norm is None else dict(norm=True, weight=_dtype(m, norm.inputs[1]), eps=norm.attrs["eps"])
    kernel = SliceRow(cols=_width(m.graph.node(sl.inputs[0])), start=sl.attrs["start"], width=_width(sl),
                      act=out.type.dtype, **norm_attrs)
    args = {"x": V(sl.inputs[0]), "y": V(out.name), "num_rows": D(_rows(out))}
    if norm is not None:
        args["norm_w"] = V(norm.inputs[1])
    return ctx.kernel_launch(m, kernel, args, (out.name,), {"num_rows": _rows(out)})


def head_gemv_constraint(m: Match) -> bool:
    """Dense weights (block formats are the plain GEMVs'), one activation dtype in and out."""
    hm = m["head_matmul"]
    w = m.graph.node(hm.inputs[1])
    heads, k = hm.attrs["heads"], w.type.shape[1]
    x = m.graph.node(hm.inputs[0])
    return (w.format is None and w.type.dtype in (DType.F32, DType.F16, DType.BF16)
            and w.type.shape[0] % heads == 0 and _width(x) == heads * k
            and x.type.dtype == hm.type.dtype and same_act_dtype(m))


def lower_head_gemv(m: Match, ctx: LowerContext) -> Launch:
    hm, sl = m["head_matmul"], m.get("slice")
    x = sl.inputs[0] if sl is not None else hm.inputs[0]
    w = m.graph.node(hm.inputs[1])
    heads, k = hm.attrs["heads"], w.type.shape[1]
    n, x_cols, x_offset = w.type.shape[0] // heads, _width(m.graph.node(x)), sl.attrs["start"] if sl else 0
    act = _dtype(m, hm.inputs[0])
    if ctx.gpu_shapes:  # lanes split each row's dot (16-byte loads where every row start allows)
        vec = vector_width(k, act, w.type.dtype)
        vec = vec if x_cols % vec == 0 and x_offset % vec == 0 else 1
        split = min(MAX_ROW_SPLIT, 1 << (cdiv(k, vec) - 1).bit_length())
        rows, tokens = GPU_LANES // split, 1 if ctx.bucket == "gemv" else GPU_TOKENS_PER_BLOCK
    else:
        vec, split, rows, tokens = 1, 1, HOST_ROWS_PER_BLOCK, HOST_TOKENS_PER_BLOCK
    kernel = HeadGemv(heads=heads, k=k, n=n, x_cols=x_cols, x_offset=x_offset, act=act, weight=w.type.dtype,
                      out=hm.type.dtype, rows_per_block=max(rows, cdiv(heads * n, GRID_Y)), split=split, vec=vec,
                      tokens_per_block=tokens)
    args = {"x": V(x), "w": V(w.name), "y": V(hm.name), "num_rows": D(_rows(hm))}
    return ctx.kernel_launch(m, kernel, args, (hm.name,), {"num_rows": _rows(hm)})


def mla_attention_constraint(m: Match) -> bool:
    a = m["mla_attention"]
    q_latent, q_pe, cache = (m.graph.node(i) for i in a.inputs[:3])
    shape, heads = cache.type.shape, a.attrs["n_heads"]
    rank = _width(a) // heads
    return (shape[0] == 1 and shape[3] == 1 and _width(q_latent) == _width(a) == heads * rank
            and _width(q_pe) == heads * (shape[4] - rank)
            and len({q_latent.type.dtype, q_pe.type.dtype, cache.type.dtype, a.type.dtype}) == 1)


def lower_mla_attention(m: Match, ctx: LowerContext) -> Launch:
    a = m["mla_attention"]
    q_latent, q_pe, cache, tables, lens, starts = a.inputs
    shape, heads = m.graph.node(cache).type.shape, a.attrs["n_heads"]
    rank, width = _width(a) // heads, shape[4]
    # as lower_attention: a block per head in the GPU's GEMV plan (few tokens: the heads
    # fill the GPU), else a group of heads a block (each cached row read once a group)
    grouped = not ctx.gpu_shapes or ctx.bucket != "gemv"
    kernel = MlaPagedAttention(n_heads=heads, rank=rank, rope_dim=width - rank, block_size=shape[2],
                               scale=a.attrs["scale"], act=a.type.dtype,
                               heads_per_block=mla_heads_per_block(heads, width) if grouped else 1,
                               vec=vector_width(width, a.type.dtype) if ctx.gpu_shapes else 1)
    args = {"q_latent": V(q_latent), "q_pe": V(q_pe), "cache": Arg("k_cache", cache), "block_tables": V(tables),
            "context_lens": V(lens), "query_start_loc": V(starts), "out": V(a.name),
            "num_seqs": D(m.graph.node(lens).type.shape[0]), "table_width": D(m.graph.node(tables).type.shape[1]),
            "num_blocks": D(_state_blocks(m.graph.node(cache)))}
    return ctx.kernel_launch(m, kernel, args, (a.name,), {"num_tokens": _rows(a)})


LATENT = (PNode("c", "slice"), PNode("kpe", "slice"), PNode("norm", "rms_norm", (("c", 0),)),
          PNode("k_rope", "rope", (("kpe", 0),)))
WRITE = PNode("latent_write", "latent_write", (("norm", 0), ("k_rope", 1)))
SLICE = PNode("slice", "slice")


def mla_patterns() -> list[Pattern]:
    return [
        Pattern("latent_q_rope_write", 76, LATENT + (PNode("q", "slice"), PNode("q_rope", "rope", (("q", 0),)), WRITE),
                lower_latent_write, constraint=latent_write_constraint,
                doc="MLA's latent RMSNorm + RoPE on k_pe and on q_pe + the latent cache write, from slices of one "
                    "down-projection (DeepSeek-V2-Lite)"),
        Pattern("latent_rope_write", 74, LATENT + (WRITE,), lower_latent_write, constraint=latent_write_constraint,
                doc="MLA's latent RMSNorm + RoPE on k_pe + the latent cache write, from slices"),
        Pattern("mla_paged_attention", 65, (PNode("mla_attention", "mla_attention"),), lower_mla_attention,
                constraint=mla_attention_constraint, doc="causal attention over MLA's paged latent cache"),
        Pattern("slice_rope", 60, (SLICE, PNode("rope", "rope", (("slice", 0),))), lower_slice_rope,
                constraint=slice_rope_constraint, doc="RoPE of a slice (MLA's q_pe, from the q_lora up-projection)"),
        # above rms_norm_gemv: a GPU GEMV recomputes its norm prologue in every output block
        Pattern("slice_rms_norm", 46, (SLICE, PNode("norm", "rms_norm", (("slice", 0),))), lower_slice_row,
                constraint=same_act_dtype, doc="RMSNorm of a slice (DeepSeek-V2's q_lora latent)"),
        Pattern("slice_head_gemv", 35, (SLICE, PNode("head_matmul", "head_matmul", (("slice", 0),))),
                lower_head_gemv, constraint=head_gemv_constraint,
                doc="a matrix per head of a slice (MLA's q_nope absorbed into the latent)"),
        Pattern("head_gemv", 30, (PNode("head_matmul", "head_matmul"),), lower_head_gemv,
                constraint=head_gemv_constraint, doc="a matrix per head (MLA's value up-projection)"),
        Pattern("slice", 1, (SLICE,), lower_slice_row, constraint=same_act_dtype, doc="columns of a value"),
    ]
