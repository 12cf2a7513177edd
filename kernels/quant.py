"""GGUF's block-quantized weight formats, as kernels read them.

A quantized matrix [N, K] is stored row by row, each row K / `block` blocks of
`nbytes` bytes, exactly as in a GGUF file, so weights go from the file to the kernels
without being expanded. Kernels decode a row 32 weights at a time (a *group*: a whole
block of the legacy formats, one of the 8 sub-blocks of a K-quant super-block) in
registers: a scale d per half-group (the same for both halves except in q6_k), a
minimum m or none, and 32 small integers q, the weights being q * d (+ m). The dot of a
group with 32 activations is then d * sum(x * q) (+ m * sum(x)): one multiply by the
scale per group, not per weight.

Layouts (little-endian, llama.cpp's ggml-common.h):
    q8_0  d, qs[32] int8                         w = q * d
    q4_0  d, qs[16]: low nibbles are 0..15,      w = (q - 8) * d
          high nibbles 16..31
    q4_1  d, m, qs[16] as q4_0                   w = q * d + m
    q5_0  d, qh[4], qs[16]: q4_0's nibbles plus  w = (q - 16) * d
          bit j of qh as bit 4 of element j
    q5_1  d, m, qh[4], qs[16] as q5_0            w = q * d + m
  super-blocks of 256 (8 groups g):
    q4_k  d, dmin, scales[12] (6-bit sc and mn per group), qs[128]: group g is the low
          (g even) or high nibbles of qs[32 (g // 2) ..][:32]    w = d sc q - dmin mn
    q5_k  d, dmin, scales[12], qh[32], qs[128] as q4_k plus bit g of qh[l] as bit 4
    q6_k  ql[128], qh[64], scales[16] int8 (one per 16 weights), d:
          group g = 4 h + s: low bits (ql[64 h + 32 (s % 2) ..] >> 4 (s // 2)) & 15,
          high bits (qh[32 h ..] >> 2 s) & 3          w = d sc (q - 32)
The numpy side (quantize, dequantize) is the `gguf` package's own: the tests' oracle.

Banded forms (host only, for int8 dots: q8_0x16, q4_0x16, q4_1x16): the same blocks of
16 consecutive rows (a *band*) regrouped so a kernel reads a group of all 16 rows with a
few vector loads, the rows in the lanes (llama.cpp's q4_0x8 repacking, by 16): per band
and group, 16 * nbytes bytes
    d[16] (float16), m[16] (q4_1), then the quants as 4-byte words, word j of the 16
    rows together (64 bytes): q4's packed bytes 4j..4j+3, q8_0's bytes 4j..4j+3 + 128
so a band is one contiguous stream and each 64-byte word vector is 16 rows' bytes for
one `vpdpbusd`. A banded matrix has as many bytes as its GGUF form (rows a multiple of 16).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from fusec.fusion.codegen.builder import KernelBuilder

I8, I32 = ir.IntType(8), ir.IntType(32)
GROUP = 32  # weights decoded at a time
HALF = 16  # a group is decoded as two vectors of 16: its first and second halves
F32V, I8V, I32V = ir.VectorType(ir.FloatType(), HALF), ir.VectorType(I8, HALF), ir.VectorType(I32, HALF)


@dataclass(frozen=True)
class BlockFormat:
    name: str  # GGUF's type name, lower case
    nbytes: int  # bytes per block of `block` weights
    has_min: bool  # w = q * d + m
    block: int = GROUP
    # byte offsets of a GGUF block's float16 scales (d, m / dmin); a banded form keeps its
    # base's (their count is what it uses: its scales sit apart from the quants)
    scale_at: tuple[int, ...] = (0,)
    base: str | None = None  # a banded form's GGUF format (module docstring)

    def row_bytes(self, k: int) -> int:
        if k % self.block:
            raise ValueError(f"{self.name} rows hold whole blocks of {self.block}; K = {k}")
        return k // self.block * self.nbytes

    @property
    def gguf_name(self) -> str:
        """The GGUF format whose blocks this stores."""
        return self.base or self.name

    @property
    def banded(self) -> bool:
        return self.base is not None

    @property
    def ggml_type(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.gguf_name.upper()]


FORMATS = {f.name: f for f in (
    BlockFormat("q8_0", 34, has_min=False),
    BlockFormat("q4_0", 18, has_min=False),
    BlockFormat("q4_1", 20, has_min=True, scale_at=(0, 2)),
    BlockFormat("q5_0", 22, has_min=False),
    BlockFormat("q5_1", 24, has_min=True, scale_at=(0, 2)),
    BlockFormat("q4_k", 144, has_min=True, block=256, scale_at=(0, 2)),
    BlockFormat("q5_k", 176, has_min=True, block=256, scale_at=(0, 2)),
    BlockFormat("q6_k", 210, has_min=False, block=256, scale_at=(208,)),
    BlockFormat("q8_0x16", 34, has_min=False, base="q8_0"),
    BlockFormat("q4_0x16", 18, has_min=False, base="q4_0"),
    BlockFormat("q4_1x16", 20, has_min=True, scale_at=(0, 2), base="q4_1"),
)}
QUANTIZABLE = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # gguf's numpy quantizer makes these
BAND = 16  # rows a banded format interleaves
BANDED = {f.base: f.name for f in FORMATS.values() if f.banded}  # GGUF format -> its banded form
GGUF_FORMATS = tuple(name for name, f in FORMATS.items() if not f.banded)  # as files store them (and GPUs read)


def bandable(fmt_name: str | None, shape: tuple[int, ...], rows: int | None = None) -> bool:
    """Whether a matrix of `shape` in fmt_name has a banded form: its rows (or each stacked
    matrix's `rows`, an expert's) in whole bands."""
    return fmt_name in BANDED and len(shape) == 2 and (shape[0] if rows is None else rows) % BAND == 0


def takes_int8_dots(fmt_name: str | None, int8_activations: bool) -> bool:
    """Whether a host GEMV over weights in fmt_name takes int8 activations: where the plan
    quantizes activations, over q8_0 / q4_0 / q4_1 and their banded forms (which nothing
    else reads: ValueError if the plan does not)."""
    if fmt_name is not None and FORMATS[fmt_name].banded:
        if not int8_activations:
            raise ValueError(f"{fmt_name} weights are read by int8 dots, off in this plan "
                             f"(models/loader.with_int8_bands gives them their GGUF form)")
        return True
    return int8_activations and fmt_name in INT8_DOT_FORMATS


def _band_parts(data: np.ndarray, fmt: BlockFormat) -> tuple[int, int]:
    """(bytes of scales, bytes of quants) in a block of fmt; ValueError unless data holds whole bands."""
    if data.ndim != 2 or data.shape[0] % BAND or data.shape[1] % fmt.nbytes:
        raise ValueError(f"{fmt.name} holds bands of {BAND} rows of whole blocks, not shape {data.shape}")
    scales = 2 * len(fmt.scale_at)
    return scales, fmt.nbytes - scales


def band(data: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """GGUF bytes [N, row_bytes] in fmt.base -> fmt's banded bytes, same shape."""
    scales, quants = _band_parts(data, fmt)
    n, row_bytes = data.shape
    blocks = np.ascontiguousarray(data, np.uint8).reshape(n // BAND, BAND, -1, fmt.nbytes).transpose(0, 2, 1, 3)
    qs = blocks[..., scales:]  # [band, group, row, quants]
    if fmt.gguf_name == "q8_0":
        qs = qs ^ np.uint8(128)
    words = qs.reshape(*qs.shape[:3], quants // 4, 4).transpose(0, 1, 3, 2, 4)  # [band, group, word, row, 4]
    head = blocks[..., :scales].reshape(*blocks.shape[:3], -1, 2).transpose(0, 1, 3, 2, 4)  # [.., scale, row, 2]
    out = np.concatenate([head.reshape(*head.shape[:2], -1), words.reshape(*words.shape[:2], -1)], axis=-1)
    return out.reshape(n, row_bytes)


def unband(data: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """fmt's banded bytes -> the GGUF bytes of fmt.base (band's inverse)."""
    scales, quants = _band_parts(data, fmt)
    n, row_bytes = data.shape
    groups = np.ascontiguousarray(data, np.uint8).reshape(n // BAND, row_bytes // fmt.nbytes, BAND * fmt.nbytes)
    head = groups[..., :BAND * scales].reshape(*groups.shape[:2], -1, BAND, 2).transpose(0, 1, 3, 2, 4)
    words = groups[..., BAND * scales:].reshape(*groups.shape[:2], quants // 4, BAND, 4).transpose(0, 1, 3, 2, 4)
    qs = words.reshape(*words.shape[:3], quants)
    if fmt.gguf_name == "q8_0":
        qs = qs ^ np.uint8(128)
    blocks = np.concatenate([head.reshape(*head.shape[:3], scales), qs], axis=-1)  # [band, group, row, nbytes]
    return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3)).reshape(n, row_bytes)


def storage_shape(shape: tuple[int, ...], fmt: BlockFormat | None) -> tuple[int, ...]:
    """The array shape that holds a [.., K] weight in `fmt` (uint8 rows of whole blocks)."""
    return tuple(shape) if fmt is None else (*shape[:-1], fmt.row_bytes(shape[-1]))


def checked_format(node, shape: tuple[int, ...]) -> BlockFormat | None:
    """A weight node's block format (None: plain dtype elements), once an array of
    `shape` is known to hold it; ValueError otherwise."""
    fmt = FORMATS[node.format] if node.format else None
    if tuple(shape) != storage_shape(node.type.shape, fmt):
        raise ValueError(f"weight {node.name}: shape {tuple(shape)} does not hold {node.type}"
                         + (f" as {fmt.name}" if fmt else ""))
    return fmt


def quantize(w: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """float32 [N, K] -> fmt's bytes [N, row_bytes(K)] (gguf's reference quantizer, then
    banded for a banded form; the legacy formats only: gguf has no numpy K-quant quantizer)."""
    from gguf.quants import quantize as gguf_quantize

    if fmt.gguf_name not in QUANTIZABLE:
        raise ValueError(f"cannot quantize to {fmt.name} here; expected one of {', '.join(QUANTIZABLE)}")
    w = np.ascontiguousarray(w, np.float32)
    fmt.row_bytes(w.shape[-1])
    data = gguf_quantize(w, fmt.ggml_type)
    return band(data, fmt) if fmt.banded else data


def dequantize(data: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """The GGUF bytes [N, row_bytes] -> float32 [N, K] (gguf's reference decoder; a
    banded form unbanded first)."""
    from gguf.quants import dequantize as gguf_dequantize

    data = unband(data, fmt) if fmt.banded else np.ascontiguousarray(data, np.uint8)
    return np.asarray(gguf_dequantize(data, fmt.ggml_type), np.float32)


def _load(kb: KernelBuilder, ptr: ir.Value, offset: ir.Value, typ: ir.Type) -> ir.Value:
    """A value of `typ` at byte `offset` of ptr. Blocks are 2-byte aligned at best, so
    the load claims no more alignment than one byte (two for the f16 scales)."""
    at = kb.b.gep(ptr, [offset], inbounds=True, source_etype=I8)
    align = 2 if typ == ir.HalfType() else 1
    return kb.b.load(at, typ=typ, align=align)


def _f16(kb: KernelBuilder, ptr: ir.Value, offset: ir.Value) -> ir.Value:
    return kb.b.fpext(_load(kb, ptr, offset, ir.HalfType()), ir.FloatType())


def _byte(kb: KernelBuilder, ptr: ir.Value, offset: ir.Value) -> ir.Value:
    return kb.b.zext(_load(kb, ptr, offset, I8), I32)


def splat(kb: KernelBuilder, v: ir.Value, typ: ir.VectorType) -> ir.Value:
    """v in all lanes of typ. A float widened from float16 (a block's scale) is splat
    before it is widened: a 16-bit broadcast and one vector convert."""
    if isinstance(v, ir.CastInstr) and v.opname == "fpext" and v.operands[0].type == ir.HalfType():
        return kb.b.fpext(splat(kb, v.operands[0], ir.VectorType(ir.HalfType(), typ.count)), typ)
    vec = kb.b.insert_element(ir.Constant(typ, ir.Undefined), v, kb.i32(0))
    return kb.b.shuffle_vector(vec, ir.Constant(typ, ir.Undefined), ir.Constant(ir.VectorType(I32, typ.count),
                                                                                 [0] * typ.count))


def _ints(values: list[int] | int) -> ir.Constant:
    return ir.Constant(I32V, values if isinstance(values, list) else [values] * HALF)


def pack(kb: KernelBuilder, values: list[ir.Value]) -> ir.Value:
    """Floats as one vector, a lane each (LLVM folds this back into the loads that made them)."""
    vec = ir.Constant(ir.VectorType(ir.FloatType(), len(values)), ir.Undefined)
    for j, v in enumerate(values):
        vec = kb.b.insert_element(vec, v, kb.i32(j))
    return vec


def zero_vector() -> ir.Constant:
    return ir.Constant(F32V, [0.0] * HALF)


def hsum(kb: KernelBuilder, vec: ir.Value) -> ir.Value:
    """The sum of a vector's elements (once per output, after the group loop), as a tree
    of half-width adds: four vector adds on the host, not fifteen scalar ones."""
    b, width = kb.b, vec.type.count
    while width > 1:
        width //= 2
        halves = [b.shuffle_vector(vec, ir.Constant(vec.type, ir.Undefined),
                                   ir.Constant(ir.VectorType(I32, width), list(range(h, h + width))))
                  for h in (0, width)]
        vec = kb.fadd(*halves)
    return b.extract_element(vec, kb.i32(0))


@dataclass
class Group:
    """32 quants as integers (two vectors of 16 i32) and what scales them:
    w = (q - zero) * d (+ m), d_hi for the second half (q6_k's scales cover 16 weights)."""

    q_lo: ir.Value
    q_hi: ir.Value
    d: ir.Value
    d_hi: ir.Value | None = None
    m: ir.Value | None = None
    zero: int = 0

    def floats(self, kb: KernelBuilder) -> tuple[ir.Value, ir.Value]:
        """q - zero as two vectors of 16 floats."""
        b = kb.b
        return tuple(b.sitofp(b.sub(q, _ints(self.zero)) if self.zero else q, F32V) for q in (self.q_lo, self.q_hi))


def _halves(kb: KernelBuilder, ptr: ir.Value, offset: ir.Value) -> list[ir.Value]:
    """32 bytes at `offset` as two vectors of 16 i32."""
    return [kb.b.zext(_load(kb, ptr, kb.b.add(offset, kb.i64(h)), I8V), I32V) for h in (0, HALF)]


def _signed_halves(kb: KernelBuilder, qs: ir.Value) -> list[ir.Value]:
    """A q8_0 group's 32 signed bytes (<32 x i8>) as two vectors of 16 i32."""
    b = kb.b
    return [b.sext(b.shuffle_vector(qs, ir.Constant(qs.type, ir.Undefined), _ints(list(range(h, h + HALF)))), I32V)
            for h in (0, HALF)]


def _nibble_halves(kb: KernelBuilder, packed: ir.Value) -> list[ir.Value]:
    """A q4 group's 16 packed bytes (<16 x i8>) as its two halves of 16 i32: the low
    nibbles (weights 0..15), the high ones (16..31)."""
    wide = kb.b.zext(packed, I32V)
    return [kb.b.and_(wide, _ints(15)), kb.b.lshr(wide, _ints(4))]


def _legacy_group(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, offset: ir.Value) -> Group:
    b = kb.b
    at = lambda n: b.add(offset, kb.i64(n))  # noqa: E731
    d = _f16(kb, ptr, offset)
    if fmt.name == "q8_0":
        halves = _signed_halves(kb, _load(kb, ptr, at(2), ir.VectorType(I8, GROUP)))
        return Group(halves[0], halves[1], d)
    m = _f16(kb, ptr, at(2)) if fmt.has_min else None
    pos = 4 if fmt.has_min else 2
    high_bits = fmt.name.startswith("q5")
    qh = None
    if high_bits:
        qh = _load(kb, ptr, at(pos), I32)
        pos += 4
    halves = _nibble_halves(kb, _load(kb, ptr, at(pos), I8V))
    if qh is not None:  # bit j of qh is bit 4 of weight j
        bits = splat(kb, qh, I32V)
        halves = [b.or_(q, b.shl(b.and_(b.lshr(bits, _ints(list(range(h, h + HALF)))), _ints(1)), _ints(4)))
                  for q, h in zip(halves, (0, HALF))]
    return Group(halves[0], halves[1], d, m=m, zero=0 if fmt.has_min else (16 if high_bits else 8))


def _k_scale_min(kb: KernelBuilder, ptr: ir.Value, scales: ir.Value, g: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Group g's 6-bit scale and minimum from q4_k / q5_k's 12 packed bytes: bytes 0..3
    hold sc 0..3, 4..7 mn 0..3, 8..11 the low 4 bits of sc / mn 4..7 whose top 2 bits
    sit above sc / mn 0..3."""
    b = kb.b
    at = lambda i: b.add(scales, kb.wide(i))  # noqa: E731
    a, c = _byte(kb, ptr, at(g)), _byte(kb, ptr, at(b.add(g, kb.i32(4))))
    top = _byte(kb, ptr, at(b.and_(g, kb.i32(3))))  # byte g - 4 for g >= 4
    six = kb.i32(63)
    low = (b.and_(a, six), b.and_(c, six))
    high = (b.or_(b.and_(c, kb.i32(15)), b.shl(b.lshr(top, kb.i32(6)), kb.i32(4))),
            b.or_(b.lshr(c, kb.i32(4)), b.shl(b.lshr(a, kb.i32(6)), kb.i32(4))))
    first = b.icmp_unsigned("<", g, kb.i32(4))
    return b.select(first, low[0], high[0]), b.select(first, low[1], high[1])


def _k_group(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, base: ir.Value, g: ir.Value) -> Group:
    """Group g (i32, 0..7) of the super-block at byte `base`."""
    b = kb.b
    at = lambda n: b.add(base, n if isinstance(n, ir.Value) else kb.i64(n))  # noqa: E731
    if fmt.name == "q6_k":
        h, s = b.lshr(g, kb.i32(2)), b.and_(g, kb.i32(3))
        ql_at = b.add(b.mul(h, kb.i32(64)), b.mul(b.and_(s, kb.i32(1)), kb.i32(32)))
        ql = _halves(kb, ptr, at(kb.wide(ql_at)))
        qh = _halves(kb, ptr, at(b.add(kb.i64(128), kb.wide(b.mul(h, kb.i32(32))))))
        lo_shift = splat(kb, b.mul(b.lshr(s, kb.i32(1)), kb.i32(4)), I32V)
        hi_shift = splat(kb, b.mul(s, kb.i32(2)), I32V)
        qs = [b.or_(b.and_(b.lshr(lo, lo_shift), _ints(15)), b.shl(b.and_(b.lshr(hi, hi_shift), _ints(3)), _ints(4)))
              for lo, hi in zip(ql, qh)]
        d = _f16(kb, ptr, at(208))
        sc_at = b.add(kb.i64(192), kb.wide(b.mul(g, kb.i32(2))))
        scale = [b.sitofp(_load(kb, ptr, at(b.add(sc_at, kb.i64(j))), I8), ir.FloatType()) for j in (0, 1)]
        return Group(qs[0], qs[1], kb.fmul(d, scale[0]), d_hi=kb.fmul(d, scale[1]), zero=32)
    d, dmin = _f16(kb, ptr, base), _f16(kb, ptr, at(2))
    sc, mn = _k_scale_min(kb, ptr, at(4), g)
    qs_at = 48 if fmt.name == "q5_k" else 16
    packed = _halves(kb, ptr, at(b.add(kb.i64(qs_at), kb.wide(b.mul(b.lshr(g, kb.i32(1)), kb.i32(32))))))
    shift = splat(kb, b.mul(b.and_(g, kb.i32(1)), kb.i32(4)), I32V)
    qs = [b.and_(b.lshr(p, shift), _ints(15)) for p in packed]
    if fmt.name == "q5_k":  # bit g of qh[l] is bit 4 of weight l
        qh = _halves(kb, ptr, at(16))
        g_vec = splat(kb, g, I32V)
        qs = [b.or_(q, b.shl(b.and_(b.lshr(h, g_vec), _ints(1)), _ints(4))) for q, h in zip(qs, qh)]
    m = b.fsub(kb.f32(0.0), kb.fmul(dmin, b.uitofp(mn, ir.FloatType())))
    return Group(qs[0], qs[1], kb.fmul(d, b.uitofp(sc, ir.FloatType())), m=m)


def group_quants(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, row: ir.Value, g: ir.Value) -> Group:
    """Group `g` (i32) of the row starting at byte `row` (i64), in a GGUF format."""
    if fmt.banded:
        raise ValueError(f"{fmt.name}'s rows are read a band at a time (band_group, banded_row_group)")
    b = kb.b
    if fmt.block == GROUP:
        return _legacy_group(kb, fmt, ptr, b.add(row, b.mul(kb.wide(g), kb.i64(fmt.nbytes))))
    per = fmt.block // GROUP
    base = b.add(row, b.mul(kb.wide(b.udiv(g, kb.i32(per))), kb.i64(fmt.nbytes)))
    return _k_group(kb, fmt, ptr, base, b.urem(g, kb.i32(per)))


def banded_row_group(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, r: ir.Value, k: int, g: ir.Value
                     ) -> Group:
    """Group `g` (i32) of row `r` (i32) of a banded [N, k] matrix (one row's bytes of the band)."""
    b = kb.b
    lane = b.urem(r, kb.i32(BAND))
    at = band_group_at(kb, fmt, band_start(kb, fmt, b.sub(r, lane), k), g)
    scales, quants = 2 * len(fmt.scale_at), fmt.nbytes - 2 * len(fmt.scale_at)

    def scale(offset: int) -> ir.Value:  # the lane's float16 among the band's 16 at `offset`
        return _f16(kb, ptr, b.add(at, kb.wide(b.add(b.mul(lane, kb.i32(2)), kb.i32(BAND * offset)))))
    d, m = scale(0), (scale(2) if fmt.has_min else None)
    words = ir.Constant(ir.VectorType(I32, quants // 4), ir.Undefined)
    for j in range(quants // 4):
        word_at = b.add(at, kb.wide(b.add(b.mul(lane, kb.i32(4)), kb.i32(BAND * (scales + 4 * j)))))
        words = b.insert_element(words, _load(kb, ptr, word_at, I32), kb.i32(j))
    qs = b.bitcast(words, ir.VectorType(I8, quants))
    if fmt.gguf_name == "q8_0":
        halves = _signed_halves(kb, b.xor(qs, _bytes(-128)))  # stored + 128
        return Group(halves[0], halves[1], d)
    halves = _nibble_halves(kb, qs)
    return Group(halves[0], halves[1], d, m=m, zero=0 if fmt.has_min else 8)


def row_group_values(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, r: ir.Value, k: int, g: ir.Value
                     ) -> tuple[ir.Value, ir.Value]:
    """The 32 weights of group `g` of row `r` (i32) of a [N, k] matrix in fmt, decoded."""
    if fmt.banded:
        return _values(kb, banded_row_group(kb, fmt, ptr, r, k, g))
    return group_values(kb, fmt, ptr, kb.b.mul(kb.wide(r), kb.i64(fmt.row_bytes(k))), g)


def group_values(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, row: ir.Value, g: ir.Value
                 ) -> tuple[ir.Value, ir.Value]:
    """The 32 weights of group `g` of a row (starting at byte `row`), decoded: two vectors of 16 floats."""
    return _values(kb, group_quants(kb, fmt, ptr, row, g))


def _values(kb: KernelBuilder, q: Group) -> tuple[ir.Value, ir.Value]:
    q_lo, q_hi = q.floats(kb)
    values = [kb.fmul(splat(kb, d, F32V), v) for d, v in ((q.d, q_lo), (q.d_hi or q.d, q_hi))]
    if q.m is not None:
        values = [kb.fadd(v, splat(kb, q.m, F32V)) for v in values]
    return values[0], values[1]


def group_term(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, row: ir.Value, g: ir.Value, x_lo: ir.Value,
               x_hi: ir.Value, x_sum: ir.Value | None) -> ir.Value:
    """What group `g` of a row adds to a 16-wide accumulator whose elements sum to the
    dot product: d * (x_lo q_lo + x_hi q_hi) (+ m * (x_lo + x_hi), x_sum).
    Accumulating vectors leaves the horizontal sum for the end of the row."""
    q = group_quants(kb, fmt, ptr, row, g)
    q_lo, q_hi = q.floats(kb)
    if q.d_hi is None:
        term = kb.fmul(splat(kb, q.d, F32V), kb.fadd(kb.fmul(x_lo, q_lo), kb.fmul(x_hi, q_hi)))
    else:
        term = kb.fadd(kb.fmul(splat(kb, q.d, F32V), kb.fmul(x_lo, q_lo)),
                       kb.fmul(splat(kb, q.d_hi, F32V), kb.fmul(x_hi, q_hi)))
    if q.m is not None:
        term = kb.fadd(term, kb.fmul(splat(kb, q.m, F32V), x_sum))
    return term


# -- int8 activations (host, AVX-512 VNNI) -------------------------------------------------
# For the formats below a group's 32 weights are w = d * u + c with u unsigned bytes, and a
# tile's activations are quantized per group of 32 to two int8 vectors, x ~ dx * (qx + qr /
# 256): qx as llama.cpp's q8_0 activations, qr the rounding error qx leaves, in 256ths of a
# step. A group's dot is then d * dx / 256 * (256 (u . qx) + u . qr) + c * sx, with sx the
# sum of the quantized x: two VNNI instructions (u8 x s8 -> i32) for the 32 products, and
# about 15 bits of each activation kept (llama.cpp's 8 alone moved SmolLM2's logits by 3%
# and its teacher-forced top-1 token at 2.6-3.5% of positions). u8 x s8 is why the weights are
# made unsigned: q8_0's q + 128, the nibbles as they are.
INT8_DOT_FORMATS = ("q8_0", "q4_0", "q4_1")
QMAX = 127  # each int8 part in [-127, 127]
FINE = 256  # qr counts 256ths of qx's step
I8X32, I8X16 = ir.VectorType(I8, GROUP), ir.VectorType(I8, HALF)
I32X8, F32X8 = ir.VectorType(I32, 8), ir.VectorType(ir.FloatType(), 8)


def _bytes(values: list[int] | int, count: int = GROUP) -> ir.Constant:
    return ir.Constant(ir.VectorType(I8, count), values if isinstance(values, list) else [values] * count)


@dataclass
class ByteGroup:
    """A group of 32 weights as unsigned bytes: w = d * u + c."""

    u: ir.Value  # <32 x i8>
    d: ir.Value
    c: ir.Value


def group_bytes(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, row: ir.Value, g: ir.Value) -> ByteGroup:
    """Group `g` (i32) of the row starting at byte `row` (i64), for INT8_DOT_FORMATS."""
    if fmt.banded:
        raise ValueError(f"{fmt.name}'s rows are read a band at a time (band_group)")
    b = kb.b
    offset = b.add(row, b.mul(kb.wide(g), kb.i64(fmt.nbytes)))
    at = lambda n: b.add(offset, kb.i64(n))  # noqa: E731
    d = _f16(kb, ptr, offset)
    if fmt.name == "q8_0":  # w = q d = (q + 128) d - 128 d
        u = b.xor(_load(kb, ptr, at(2), I8X32), _bytes(-128))
        return ByteGroup(u, d, kb.fmul(d, kb.f32(-128.0)))
    packed = _load(kb, ptr, at(4 if fmt.has_min else 2), I8X16)
    low, high = b.and_(packed, _bytes(15, HALF)), b.lshr(packed, _bytes(4, HALF))
    u = b.shuffle_vector(low, high, ir.Constant(ir.VectorType(I32, GROUP), list(range(GROUP))))
    c = _f16(kb, ptr, at(2)) if fmt.has_min else kb.fmul(d, kb.f32(-8.0))  # q4_1: + m; q4_0: (q - 8) d
    return ByteGroup(u, d, c)


@dataclass
class ActivationGroup:
    """32 activations quantized: x ~ dx * (qx + qr / FINE); total = FINE sum(qx) + sum(qr)
    (a float holding an integer exactly: |total| < 2**21), so sum(x) ~ dx / FINE * total."""

    qx: ir.Value  # <32 x i8>
    qr: ir.Value  # <32 x i8>
    dx: ir.Value
    total: ir.Value


def quantize_activations(kb: KernelBuilder, x_lo: ir.Value, x_hi: ir.Value) -> ActivationGroup:
    """32 floats (two vectors of 16), quantized as quantize_activations_reference does."""
    b = kb.b
    i32x32, f32x32 = ir.VectorType(I32, GROUP), ir.VectorType(ir.FloatType(), GROUP)
    x = b.shuffle_vector(x_lo, x_hi, ir.Constant(i32x32, list(range(GROUP))))
    # fmaximum, not fmax: a NaN among x makes dx NaN, so the outputs stay NaN as the float path's
    amax = kb.intrinsic("llvm.vector.reduce.fmaximum.v32f32", [kb.intrinsic("llvm.fabs.v32f32", [x], f32x32)])
    positive = b.fcmp_ordered(">", amax, kb.f32(0.0))
    inverse = b.select(positive, b.fdiv(kb.f32(float(QMAX)), amax), kb.f32(0.0))
    dx = b.fdiv(amax, kb.f32(float(QMAX)))
    limit = (splat(kb, ir.Constant(I32, -QMAX), i32x32), splat(kb, ir.Constant(I32, QMAX), i32x32))

    def nearest(v: ir.Value) -> ir.Value:  # plain IEEE arithmetic throughout, as the numpy oracle's
        q = b.fptosi(kb.intrinsic("llvm.roundeven.v32f32", [v], f32x32), i32x32)
        return kb.intrinsic("llvm.smax.v32i32", [kb.intrinsic("llvm.smin.v32i32", [q, limit[1]], i32x32),
                                                  limit[0]], i32x32)
    qx = nearest(b.fmul(x, splat(kb, inverse, f32x32)))
    rest = b.fsub(x, b.fmul(b.sitofp(qx, f32x32), splat(kb, dx, f32x32)))
    qr = nearest(b.fmul(rest, splat(kb, b.fmul(inverse, kb.f32(float(FINE))), f32x32)))
    total = b.add(b.mul(kb.intrinsic("llvm.vector.reduce.add.v32i32", [qx], I32), kb.i32(FINE)),
                  kb.intrinsic("llvm.vector.reduce.add.v32i32", [qr], I32))
    return ActivationGroup(b.trunc(qx, I8X32), b.trunc(qr, I8X32), dx, b.sitofp(total, ir.FloatType()))


def byte_dot(kb: KernelBuilder, u: ir.Value, qx: ir.Value, qr: ir.Value) -> ir.Value:
    """FINE * (u . qx) + u . qr as 8 partial sums (<8 x float>): two AVX-512 VNNI vpdpbusd."""
    b = kb.b

    def dot(q: ir.Value) -> ir.Value:
        return kb.intrinsic("llvm.x86.avx512.vpdpbusd.256",
                             [ir.Constant(I32X8, [0] * 8), b.bitcast(u, I32X8), b.bitcast(q, I32X8)], I32X8)
    fine = splat(kb, ir.Constant(I32, FINE.bit_length() - 1), I32X8)
    return b.sitofp(b.add(b.shl(dot(qx), fine), dot(qr)), F32X8)


def band_start(kb: KernelBuilder, fmt: BlockFormat, first_row: ir.Value, k: int) -> ir.Value:
    """The byte (i64) where the band whose first row is first_row (i32, a multiple of BAND) starts."""
    return kb.b.mul(kb.wide(first_row), kb.i64(fmt.row_bytes(k)))


def band_group_at(kb: KernelBuilder, fmt: BlockFormat, start: ir.Value, g: ir.Value) -> ir.Value:
    """The byte (i64) where group g (i32) of the band at `start` starts."""
    return kb.b.add(start, kb.b.mul(kb.wide(g), kb.i64(BAND * fmt.nbytes)))


BAND_F32, BAND_I32 = ir.VectorType(ir.FloatType(), BAND), ir.VectorType(I32, BAND)


@dataclass
class BandGroup:
    """A group of a band's 16 rows, a row a lane: w = d * u + c."""

    words: list[ir.Value]  # 8 <16 x i32>: word j holds each row's unsigned bytes 4j..4j+3 of the group
    d: ir.Value  # <16 x float>
    m: ir.Value | None  # <16 x float> (q4_1), else c = shift * d
    shift: int  # c's multiple of d where there is no m: q8_0's -128, q4_0's -8


def band_group(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, at: ir.Value) -> BandGroup:
    """The band group at byte `at` (band_group_at) of a banded format: its scales with
    one vector load each, its quants with four (q4: each word's low nibbles are bytes
    4j..4j+3, high nibbles bytes 16 + 4j..) or eight (q8_0) 64-byte loads."""
    b = kb.b
    half16 = ir.VectorType(ir.HalfType(), BAND)
    scales = 2 * len(fmt.scale_at)

    def load(offset: int, typ: ir.Type) -> ir.Value:
        return b.load(b.gep(ptr, [b.add(at, kb.i64(offset))], inbounds=True, source_etype=I8), typ=typ, align=2)
    d = b.fpext(load(0, half16), BAND_F32)
    m = b.fpext(load(2 * BAND, half16), BAND_F32) if fmt.has_min else None
    raw = [load(BAND * (scales + 4 * j), BAND_I32) for j in range((fmt.nbytes - scales) // 4)]
    if fmt.gguf_name == "q8_0":
        return BandGroup(raw, d, None, shift=-128)
    nibbles = splat(kb, ir.Constant(I32, 0x0F0F0F0F), BAND_I32)
    four = splat(kb, ir.Constant(I32, 4), BAND_I32)
    words = [b.and_(w, nibbles) for w in raw] + [b.and_(b.lshr(w, four), nibbles) for w in raw]
    return BandGroup(words, d, m, shift=0 if fmt.has_min else -8)


INT8_CHAINS = 8  # vpdpbusd chains in flight: its latency (4 cycles on Zen 4) x its throughput (2 a cycle)


def sliced_dots(kb: KernelBuilder, slices: list[ir.Value], xs: list[list[ir.Value]]) -> list[ir.Value]:
    """For each x of xs, sum_j slices[j] . x[j] in each lane: slices[j] holds 4 unsigned
    bytes a lane, x[j] 4 signed bytes (an i32) for all lanes: one vpdpbusd each. The dots'
    chains are interleaved, and with fewer than INT8_CHAINS dots each is split into
    several chains summed at the end."""
    typ = slices[0].type
    ways = max(1, min(len(slices), INT8_CHAINS // len(xs)))
    accs = [[ir.Constant(typ, [0] * typ.count)] * ways for _ in xs]
    for j, s in enumerate(slices):
        for acc, x in zip(accs, xs):
            acc[j % ways] = kb.intrinsic(f"llvm.x86.avx512.vpdpbusd.{32 * typ.count}",
                                         [acc[j % ways], s, splat(kb, x[j], typ)], typ)
    sums = []
    for acc in accs:
        total = acc[0]
        for part in acc[1:]:
            total = kb.b.add(total, part)
        sums.append(total)
    return sums


def quantize_activations_reference(x: np.ndarray) -> np.ndarray:
    """What a kernel with int8 activations multiplies by: each group of 32 of x's last
    axis quantized as quantize_activations does, back in float32 (the tests' oracle)."""
    groups = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, GROUP)
    amax = np.abs(groups).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax > 0, np.float32(QMAX) / amax, np.float32(0.0)).astype(np.float32)
    dx = (amax / np.float32(QMAX)).astype(np.float32)
    qx = np.clip(np.rint(groups * inverse), -QMAX, QMAX).astype(np.float32)
    rest = (groups - qx * dx).astype(np.float32)
    qr = np.clip(np.rint(rest * (inverse * np.float32(FINE))), -QMAX, QMAX).astype(np.float32)
    return ((qx + qr / np.float32(FINE)) * dx).astype(np.float32).reshape(x.shape)
