"""Counter-based random numbers, the same bits in a kernel and in numpy.

`uniform(seed, stream, index)` hashes three 32-bit words with two rounds of
MurmurHash3's finaliser: no generator state, so any element of any draw can be
computed where it is needed (a kernel lane, a numpy oracle) and a seeded request
gives the same numbers whatever batch it runs in. `FillRandom` fills a tensor with
it (dummy weights are made on the device that holds them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from llvmlite import ir

from fusec.fusion.codegen.builder import I32, KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.kernels.base import Kernel, cdiv

GOLDEN, M1, M2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35
MASK = 0xFFFFFFFF


# -- numpy ------------------------------------------------------------------------------
def _fmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(M1)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(M2)
    return h ^ (h >> np.uint32(16))


def hash3(a, b, c) -> np.ndarray:
    """uint32 hash of three uint32 words (arrays broadcast)."""
    with np.errstate(over="ignore"):
        a, b, c = (np.asarray(np.asarray(x, np.int64) & MASK, np.uint32) for x in (a, b, c))
        h = _fmix((a * np.uint32(GOLDEN)) ^ b)
        return _fmix((h * np.uint32(GOLDEN)) ^ c)


def to_unit(h) -> np.ndarray:
    """uint32 hash -> float32 in the open interval (0, 1): the top 23 bits, centred. (With
    24 bits the largest value rounds to 1.0, whose Gumbel noise is infinite.)"""
    return ((np.asarray(h, np.uint32) >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)


def uniform(a, b, c) -> np.ndarray:
    """to_unit(hash3(a, b, c)), exactly as the kernels compute it."""
    return to_unit(hash3(a, b, c))


# -- IR ----------------------------------------------------------------------------------
def _fmix_ir(kb: KernelBuilder, h: ir.Value) -> ir.Value:
    b = kb.b
    h = b.xor(h, b.lshr(h, kb.i32(16)))
    h = b.mul(h, ir.Constant(I32, M1 - (1 << 32)))
    h = b.xor(h, b.lshr(h, kb.i32(13)))
    h = b.mul(h, ir.Constant(I32, M2 - (1 << 32)))
    return b.xor(h, b.lshr(h, kb.i32(16)))


def hash3_ir(kb: KernelBuilder, a: ir.Value, b_: ir.Value, c: ir.Value) -> ir.Value:
    b, golden = kb.b, ir.Constant(I32, GOLDEN - (1 << 32))
    h = _fmix_ir(kb, b.xor(b.mul(a, golden), b_))
    return _fmix_ir(kb, b.xor(b.mul(h, golden), c))


def uniform_ir(kb: KernelBuilder, a: ir.Value, b_: ir.Value, c: ir.Value) -> ir.Value:
    b = kb.b
    top = b.uitofp(b.lshr(hash3_ir(kb, a, b_, c), kb.i32(9)), kb.f32(0).type)
    return b.fmul(b.fadd(top, kb.f32(0.5)), kb.f32(2.0 ** -23))


# -- dummy weights ------------------------------------------------------------------------
FILL_CHUNK = 4096  # elements per block


@dataclass(frozen=True)
class FillRandom(Kernel):
    """y[i] = shift + scale * (2 u - 1), u = uniform(seed, stream + high word of i, low
    word of i): a uniform fill with mean `shift` and standard deviation scale / sqrt(3)."""

    family = "fill_random"
    out: DType

    def params(self) -> list[Param]:
        return [Param("y", "ptr"), Param("n", "i32"), Param("seed", "i32"), Param("stream", "i32"),
                Param("scale", "f32"), Param("shift", "f32")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return cdiv(dims["n"], FILL_CHUNK), 1

    def body(self, kb: KernelBuilder) -> None:
        b = kb.b
        start = b.mul(kb.block_id(0), kb.i32(FILL_CHUNK))
        stop = kb.imin(b.add(start, kb.i32(FILL_CHUNK)), kb["n"])
        with kb.loop(b.add(start, kb.lane()), stop, kb.lanes()) as i:
            u = uniform_ir(kb, kb["seed"], kb["stream"], i)
            v = b.fadd(kb["shift"], b.fmul(kb["scale"], b.fsub(b.fmul(u, kb.f32(2.0)), kb.f32(1.0))))
            kb.store(kb["y"], i, v, self.out)


def fill_random_reference(n: int, seed: int, stream: int, scale: float, shift: float) -> np.ndarray:
    u = uniform(seed, stream, np.arange(n, dtype=np.int64))
    return np.float32(shift) + np.float32(scale) * (u * np.float32(2.0) - np.float32(1.0))


def weight_fill(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(scale, shift) of a dummy weight: norm weights near 1, matrices with standard
    deviation 1/sqrt(fan-in)."""
    if name.endswith("norm"):
        return 0.1 * math.sqrt(3.0), 1.0
    return math.sqrt(3.0 / shape[-1]), 0.0


MAX_FILL = 1 << 30  # elements per launch (the kernel indexes with i32)


def fill_spans(n: int, tensor: int) -> list[tuple[int, int, int]]:
    """(first element, count, stream) per launch filling a tensor of n elements: past
    MAX_FILL elements the stream word changes, so no two elements share a counter."""
    return [(start, min(MAX_FILL, n - start), tensor + ((start // MAX_FILL) << 20))
            for start in range(0, max(n, 1), MAX_FILL)]
