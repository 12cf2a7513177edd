"""Element types of the IR and their numpy storage.

The reference interpreter computes in float32 but rounds every value to the precision
of its declared dtype, so it models f16/bf16 storage exactly. bf16 has no numpy dtype:
its storage form is the upper 16 bits of a float32, held in uint16.
"""
from __future__ import annotations

import enum

import numpy as np


class DType(enum.Enum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    I32 = "i32"

    @property
    def storage(self) -> np.dtype:
        return np.dtype({DType.F32: np.float32, DType.F16: np.float16,
                         DType.BF16: np.uint16, DType.I32: np.int32}[self])

    @property
    def is_float(self) -> bool:
        return self is not DType.I32

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @classmethod
    def parse(cls, name: str) -> "DType":
        aliases = {"float32": "f32", "float": "f32", "float16": "f16", "half": "f16",
                   "bfloat16": "bf16", "int32": "i32"}
        try:
            return cls(aliases.get(name, name))
        except ValueError:
            raise ValueError(f"unknown dtype {name!r}; expected one of f32, f16, bf16") from None


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def to_storage(x: np.ndarray, dtype: DType) -> np.ndarray:
    """float32 (or int) values -> the storage array of `dtype`."""
    if dtype is DType.BF16:
        return f32_to_bf16_bits(np.asarray(x, dtype=np.float32))
    return np.asarray(x).astype(dtype.storage, copy=False)


def from_storage(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Storage array -> float32 values (int32 stays int32)."""
    if dtype is DType.BF16:
        return bf16_bits_to_f32(x)
    if dtype is DType.I32:
        return np.asarray(x, dtype=np.int32)
    return np.asarray(x).astype(np.float32, copy=False)


def round_to(x: np.ndarray, dtype: DType) -> np.ndarray:
    """float32 values rounded to the precision of `dtype`, still float32."""
    if dtype is DType.F32:
        return np.asarray(x, dtype=np.float32)
    if dtype is DType.I32:
        return np.asarray(x, dtype=np.int32)
    return from_storage(to_storage(x, dtype), dtype)
