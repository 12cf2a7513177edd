"""What every kernel generator provides, and shared helpers for writing bodies."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import ClassVar, Mapping

from llvmlite import ir

from fusec.fusion.codegen.builder import KernelBuilder, Param
from fusec.fusion.codegen.target import Target
from fusec.fusion.dtypes import DType

GPU_LANES = 128  # threads per block unless a kernel says otherwise


@dataclass(frozen=True)
class Kernel:
    """A kernel specialised on its static shape, dtypes and options.

    Subclasses are frozen dataclasses (their fields are the specialisation), set
    `family`, and implement `params`, `grid` and `body`. `name` is unique per
    specialisation, so identical kernels across layers are compiled once.
    """

    family: ClassVar[str] = "kernel"

    @cached_property  # kernels are looked up by name at every launch a step prepares
    def name(self) -> str:
        spec = repr(sorted((k, str(v)) for k, v in asdict(self).items()))
        return f"{self.family}_{hashlib.sha256(spec.encode()).hexdigest()[:12]}"

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name).value if isinstance(getattr(self, f.name), DType) else getattr(self, f.name)}"
                 for f in fields(self)]
        return f"{self.family}({', '.join(parts)})"

    def params(self) -> list[Param]:
        raise NotImplementedError

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        raise NotImplementedError

    def lanes(self, target: Target) -> int:
        return GPU_LANES if target.is_gpu else 1

    def body(self, kb: KernelBuilder) -> None:
        raise NotImplementedError

    def build(self, target: Target) -> str:
        """LLVM IR text of this kernel for `target`."""
        kb = KernelBuilder(self.name, target, self.params())
        self.body(kb)
        return str(kb.finish())


def round_to(kb: KernelBuilder, v: ir.Value, dtype: DType) -> ir.Value:
    """v rounded to dtype's precision and back to float (what a store + load would do)."""
    b = kb.b
    if dtype is DType.F16:
        return b.fpext(b.fptrunc(v, ir.HalfType()), ir.FloatType())
    if dtype is DType.BF16:
        bits = b.zext(kb._f32_to_bf16(v), ir.IntType(32))
        return b.bitcast(b.shl(bits, kb.i32(16)), ir.FloatType())
    return v


def row_offset(kb: KernelBuilder, row: ir.Value, width: int) -> ir.Value:
    """row * width as i64."""
    return kb.b.mul(kb.wide(row), kb.i64(width))


def silu(kb: KernelBuilder, g: ir.Value) -> ir.Value:
    b = kb.b
    return b.fdiv(g, b.fadd(kb.f32(1.0), kb.exp(b.fneg(g))))


GELU_C = 0.7978845608028654  # sqrt(2 / pi)


def tanh(kb: KernelBuilder, y: ir.Value) -> ir.Value:
    """tanh(y) as 1 - 2 / (exp(2y) + 1): exact at both ends (exp overflowing to inf gives 1)."""
    b = kb.b
    return b.fsub(kb.f32(1.0), b.fdiv(kb.f32(2.0), b.fadd(kb.exp(b.fmul(kb.f32(2.0), y)), kb.f32(1.0))))


def softcap(kb: KernelBuilder, x: ir.Value, cap: float) -> ir.Value:
    """cap * tanh(x / cap) (Gemma 2's attention and final logits)."""
    b = kb.b
    return b.fmul(kb.f32(cap), tanh(kb, b.fdiv(x, kb.f32(cap))))


def gelu_tanh(kb: KernelBuilder, x: ir.Value) -> ir.Value:
    """GELU's tanh approximation (PyTorch's approximate="tanh")."""
    b = kb.b
    y = b.fmul(kb.f32(GELU_C), b.fadd(x, b.fmul(kb.f32(0.044715), b.fmul(x, b.fmul(x, x)))))
    return b.fmul(b.fmul(kb.f32(0.5), x), b.fadd(kb.f32(1.0), tanh(kb, y)))


# erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0: relative error below 1.2e-7
# (Numerical Recipes' erfcc, after Chebyshev fitting)
ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
               1.48851587, -0.82215223, 0.17087277)


def gelu(kb: KernelBuilder, x: ir.Value) -> ir.Value:
    """x * Phi(x) with Phi(x) = erfc(-x / sqrt(2)) / 2 (the exact GELU)."""
    b = kb.b
    z = b.fmul(x, kb.f32(-0.7071067811865476))
    az = kb.fmax(z, b.fneg(z))
    t = b.fdiv(kb.f32(1.0), b.fadd(kb.f32(1.0), b.fmul(kb.f32(0.5), az)))
    poly = kb.f32(ERFC_COEFFS[-1])
    for c in reversed(ERFC_COEFFS[:-1]):
        poly = b.fadd(kb.f32(c), b.fmul(t, poly))
    erfc_abs = b.fmul(t, kb.exp(b.fadd(b.fneg(b.fmul(az, az)), poly)))
    erfc = b.select(b.fcmp_ordered(">=", z, kb.f32(0.0)), erfc_abs, b.fsub(kb.f32(2.0), erfc_abs))
    return b.fmul(b.fmul(kb.f32(0.5), x), erfc)


GATES = {"silu_mul": silu, "gelu_tanh_mul": gelu_tanh}  # a gated MLP's op kind -> its activation


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
