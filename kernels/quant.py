"""GGUF's block-quantized weight formats, as kernels read them.

A quantized matrix [N, K] is stored row by row, each row K / 32 blocks of `nbytes`
bytes, exactly as in a GGUF file, so weights go from the file to the kernels without
being expanded. A kernel decodes a block in registers (`block_dot`): a float16 scale
d (and for the `_1` formats a float16 minimum m) and 32 small integers q, the weights
being q * d (+ m). The dot of a block with 32 activations is then
d * sum(x * q) (+ m * sum(x)): one multiply by the scale per block, not per weight.

Layouts (little-endian, llama.cpp's ggml-common.h):
    q8_0  d, qs[32] int8                         w = q * d
    q4_0  d, qs[16]: low nibbles are 0..15,      w = (q - 8) * d
          high nibbles 16..31
    q4_1  d, m, qs[16] as q4_0                   w = q * d + m
    q5_0  d, qh[4], qs[16]: q4_0's nibbles plus  w = (q - 16) * d
          bit j of qh as bit 4 of element j
    q5_1  d, m, qh[4], qs[16] as q5_0            w = q * d + m
The numpy side (quantize, dequantize) is the `gguf` package's own: the tests' oracle.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from fusec.fusion.codegen.builder import KernelBuilder

I8, I32 = ir.IntType(8), ir.IntType(32)


@dataclass(frozen=True)
class BlockFormat:
    name: str  # GGUF's type name, lower case
    nbytes: int  # bytes per block of `block` weights
    has_min: bool  # the `_1` formats: w = q * d + m
    high_bits: bool  # q5: a fifth bit per weight in qh
    block: int = 32

    def row_bytes(self, k: int) -> int:
        if k % self.block:
            raise ValueError(f"{self.name} rows hold whole blocks of {self.block}; K = {k}")
        return k // self.block * self.nbytes

    @property
    def ggml_type(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.name.upper()]


FORMATS = {f.name: f for f in (
    BlockFormat("q8_0", 34, has_min=False, high_bits=False),
    BlockFormat("q4_0", 18, has_min=False, high_bits=False),
    BlockFormat("q4_1", 20, has_min=True, high_bits=False),
    BlockFormat("q5_0", 22, has_min=False, high_bits=True),
    BlockFormat("q5_1", 24, has_min=True, high_bits=True),
)}


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
    """float32 [N, K] -> the GGUF bytes [N, row_bytes(K)] (gguf's reference quantizer)."""
    from gguf.quants import quantize as gguf_quantize

    w = np.ascontiguousarray(w, np.float32)
    fmt.row_bytes(w.shape[-1])
    return gguf_quantize(w, fmt.ggml_type)


def dequantize(data: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """The GGUF bytes [N, row_bytes] -> float32 [N, K] (gguf's reference decoder)."""
    from gguf.quants import dequantize as gguf_dequantize

    return np.asarray(gguf_dequantize(np.ascontiguousarray(data, np.uint8), fmt.ggml_type), np.float32)


HALF = 16  # a block is decoded as two vectors of 16: its first and second halves
F32V, I8V, I32V = ir.VectorType(ir.FloatType(), HALF), ir.VectorType(I8, HALF), ir.VectorType(I32, HALF)


def _load(kb: KernelBuilder, ptr: ir.Value, offset: ir.Value, typ: ir.Type) -> ir.Value:
    """A value of `typ` at byte `offset` of ptr. Blocks are 2-byte aligned at best, so
    the load claims no more alignment than one byte (two for the f16 scales)."""
    at = kb.b.gep(ptr, [offset], inbounds=True, source_etype=I8)
    align = 2 if typ == ir.HalfType() else 1
    return kb.b.load(at, typ=typ, align=align)


def _f16(kb: KernelBuilder, ptr: ir.Value, offset: ir.Value) -> ir.Value:
    return kb.b.fpext(_load(kb, ptr, offset, ir.HalfType()), ir.FloatType())


def _splat(kb: KernelBuilder, v: ir.Value, typ: ir.VectorType) -> ir.Value:
    vec = kb.b.insert_element(ir.Constant(typ, ir.Undefined), v, kb.i32(0))
    return kb.b.shuffle_vector(vec, ir.Constant(typ, ir.Undefined), ir.Constant(I32V, [0] * HALF))


def pack(kb: KernelBuilder, values: list[ir.Value]) -> ir.Value:
    """16 floats as one vector (LLVM folds this back into the loads that made them)."""
    vec = ir.Constant(F32V, ir.Undefined)
    for j, v in enumerate(values):
        vec = kb.b.insert_element(vec, v, kb.i32(j))
    return vec


def zero_vector() -> ir.Constant:
    return ir.Constant(F32V, [0.0] * HALF)


def hsum(kb: KernelBuilder, vec: ir.Value) -> ir.Value:
    """The sum of a vector's elements (once per output, after the block loop)."""
    total = kb.b.extract_element(vec, kb.i32(0))
    for j in range(1, HALF):
        total = kb.fadd(total, kb.b.extract_element(vec, kb.i32(j)))
    return total


def block_quants(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, offset: ir.Value
                 ) -> tuple[ir.Value, ir.Value | None, ir.Value, ir.Value]:
    """The block at byte `offset`: its scale d, its minimum m (None without one) and its
    quants as two float vectors (weights 0..15 and 16..31), the format's zero point
    already subtracted."""
    b = kb.b
    at = lambda n: b.add(offset, kb.i64(n))  # noqa: E731
    d = _f16(kb, ptr, offset)
    if fmt.name == "q8_0":
        qs = _load(kb, ptr, at(2), ir.VectorType(I8, 2 * HALF))
        halves = [b.shuffle_vector(qs, ir.Constant(qs.type, ir.Undefined), ir.Constant(I32V, list(range(h, h + HALF))))
                  for h in (0, HALF)]
        return d, None, b.sitofp(halves[0], F32V), b.sitofp(halves[1], F32V)
    m = _f16(kb, ptr, at(2)) if fmt.has_min else None
    pos = 4 if fmt.has_min else 2
    qh = None
    if fmt.high_bits:
        qh = _load(kb, ptr, at(pos), I32)
        pos += 4
    packed = b.zext(_load(kb, ptr, at(pos), I8V), I32V)
    halves = [b.and_(packed, ir.Constant(I32V, [15] * HALF)), b.lshr(packed, ir.Constant(I32V, [4] * HALF))]
    if qh is not None:  # bit j of qh is bit 4 of weight j
        bits = _splat(kb, qh, I32V)
        halves = [b.or_(q, b.shl(b.and_(b.lshr(bits, ir.Constant(I32V, list(range(h, h + HALF)))),
                                        ir.Constant(I32V, [1] * HALF)), ir.Constant(I32V, [4] * HALF)))
                  for q, h in zip(halves, (0, HALF))]
    zero = 0 if fmt.has_min else (16 if fmt.high_bits else 8)
    if zero:
        halves = [b.sub(q, ir.Constant(I32V, [zero] * HALF)) for q in halves]
    return d, m, b.sitofp(halves[0], F32V), b.sitofp(halves[1], F32V)


def block_values(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, offset: ir.Value) -> tuple[ir.Value, ir.Value]:
    """The 32 weights of the block at byte `offset`, decoded: two vectors of 16 floats."""
    d, m, q_lo, q_hi = block_quants(kb, fmt, ptr, offset)
    scale = _splat(kb, d, F32V)
    values = [kb.fmul(scale, q) for q in (q_lo, q_hi)]
    if m is not None:
        values = [kb.fadd(v, _splat(kb, m, F32V)) for v in values]
    return values[0], values[1]


def block_term(kb: KernelBuilder, fmt: BlockFormat, ptr: ir.Value, offset: ir.Value, x_lo: ir.Value,
               x_hi: ir.Value, x_sum: ir.Value | None) -> ir.Value:
    """What the block at byte `offset` adds to a 16-wide accumulator whose elements sum
    to the dot product: d * (x_lo q_lo + x_hi q_hi) (+ m * (x_lo + x_hi), x_sum).
    Accumulating vectors leaves the horizontal sum for the end of the row."""
    d, m, q_lo, q_hi = block_quants(kb, fmt, ptr, offset)
    dot = kb.fadd(kb.fmul(x_lo, q_lo), kb.fmul(x_hi, q_hi))
    term = kb.fmul(_splat(kb, d, F32V), dot)
    if m is not None:
        term = kb.fadd(term, kb.fmul(_splat(kb, m, F32V), x_sum))
    return term
