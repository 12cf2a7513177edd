"""y[T, N] = x[T, K] @ w[N, K].T through cuBLASLt (nvmath-python's bindings): f16, bf16
or f32 in, the same or f32 out (the logits), f32 accumulate, the algorithm from
cuBLASLt's heuristic.

cuBLASLt is column-major: a row-major [R, C] array is a column-major [C, R] one. So the
product is computed as y.T[N, T] = op_T(w)[N, K] @ x.T[K, T]: A is w read as [K, N]
with TRANSA, B is x read as [K, T], D is y read as [N, T].
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fusec.fusion.dtypes import DType
from fusec.runtime.device import GemmShape

WORKSPACE_BYTES = 32 << 20
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14  # cudaDataType_t
DATA_TYPES = {DType.F32: CUDA_R_32F, DType.F16: CUDA_R_16F, DType.BF16: CUDA_R_16BF}
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
ALGO_BYTES = 64  # sizeof(cublasLtMatmulAlgo_t)


class _GemmPlan:
    """Descriptors and the chosen algorithm for one shape: cuBLASLt's heuristic offers up
    to `candidates` algorithms, best first; `algo` is the one used (an autotuned choice
    replaces the first)."""

    def __init__(self, lt, handle: int, shape: GemmShape, workspace_bytes: int, candidates: int = 1) -> None:
        self.lt = lt
        types = {"a": DATA_TYPES[shape.dtype], "b": DATA_TYPES[shape.dtype], "d": DATA_TYPES[shape.y_dtype]}
        self.desc = lt.matmul_desc_create(CUBLAS_COMPUTE_32F, CUDA_R_32F)
        self._set(lt.matmul_desc_set_attribute, self.desc, lt.MatmulDescAttribute.TRANSA, np.int32(CUBLAS_OP_T))
        self._set(lt.matmul_desc_set_attribute, self.desc, lt.MatmulDescAttribute.TRANSB, np.int32(CUBLAS_OP_N))
        self.layouts = {k: lt.matrix_layout_create(types[k], rows, cols, ld)
                        for k, (rows, cols, ld) in shape.layouts().items()}
        pref = lt.matmul_preference_create()
        try:
            self._set(lt.matmul_preference_set_attribute, pref, lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES,
                      np.uint64(workspace_bytes))
            self.heuristic = lt.MatmulHeuristicResult(candidates)
            found = np.zeros(1, np.int32)
            a, b, d = self.layouts["a"], self.layouts["b"], self.layouts["d"]
            lt.matmul_algo_get_heuristic(handle, self.desc, a, b, d, d, pref, candidates, self.heuristic.ptr,
                                         found.ctypes.data)
        finally:
            lt.matmul_preference_destroy(pref)
        if found[0] < 1:
            raise RuntimeError(f"cuBLASLt has no algorithm for {shape}")
        stride = lt.matmul_heuristic_result_dtype.itemsize
        # an algorithm is the first ALGO_BYTES of its heuristic result
        self.candidates = [self.heuristic.ptr + i * stride for i in range(int(found[0]))]
        self.algo = self.candidates[0]
        self._tuned: np.ndarray | None = None

    def use(self, algo: bytes) -> None:
        """Run with an algorithm chosen earlier (its ALGO_BYTES, from autotune)."""
        self._tuned = np.frombuffer(algo, np.uint8).copy()
        self.algo = self._tuned.ctypes.data

    @staticmethod
    def _set(setter, obj: int, attr, value: np.generic) -> None:
        buf = np.array(value)
        setter(obj, attr, buf.ctypes.data, buf.nbytes)

    def close(self) -> None:
        for layout in self.layouts.values():
            self.lt.matrix_layout_destroy(layout)
        self.lt.matmul_desc_destroy(self.desc)


class CublasLt:
    """One cuBLASLt handle, a workspace, and a plan per GEMM shape met so far, enqueuing
    on one stream. It holds its workspace buffer: a raw pointer alone would dangle once
    the owner freed it."""

    def __init__(self, workspace: Any, stream: int, workspace_bytes: int = WORKSPACE_BYTES) -> None:
        from nvmath.bindings import cublasLt as lt

        self.lt = lt
        self.handle = lt.create()
        self.workspace = workspace
        self.workspace_ptr, self.workspace_bytes = workspace.ptr, workspace_bytes
        self.stream = stream
        self.plans: dict[GemmShape, _GemmPlan] = {}
        self.tuned: dict[GemmShape, bytes] = {}  # autotuned algorithms, for exact shapes
        self._alpha, self._beta = np.ones(1, np.float32), np.zeros(1, np.float32)

    def plan(self, shape: GemmShape) -> _GemmPlan:
        plan = self.plans.get(shape)
        if plan is None:
            plan = self.plans[shape] = _GemmPlan(self.lt, self.handle, shape, self.workspace_bytes)
            if shape in self.tuned:
                plan.use(self.tuned[shape])
        return plan

    def candidates(self, shape: GemmShape, count: int) -> list[int]:
        """Up to `count` algorithms for the shape, the heuristic's choice first (valid
        while this library lives)."""
        old = self.plans.pop(shape, None)
        if old is not None:
            old.close()
        plan = self.plans[shape] = _GemmPlan(self.lt, self.handle, shape, self.workspace_bytes, count)
        return plan.candidates

    @staticmethod
    def algo_bytes(algo: int) -> bytes:
        import ctypes

        return ctypes.string_at(algo, ALGO_BYTES)

    def prepare(self, shape: GemmShape, x: Any, w: Any, y: Any) -> Callable[[], None]:
        """A call enqueuing y = x @ w.T (device buffers) on the library's stream."""
        if shape.weight_format:
            raise NotImplementedError(f"cuBLASLt GEMMs of {shape.weight_format} weights (GPUs load them dequantized)")
        if shape.w_dtype is not shape.dtype:
            raise NotImplementedError(f"cuBLASLt GEMMs of {shape.dtype.value} by {shape.w_dtype.value} weights")
        self.plan(shape)  # descriptors and the algorithm chosen now, not during a capture
        stream = self.stream
        return lambda: self.matmul(shape, x.ptr, w.ptr, y.ptr, stream)

    def matmul(self, shape: GemmShape, x: int, w: int, y: int, stream: int, algo: int | None = None) -> None:
        """Enqueue y = x @ w.T on the stream (device pointers)."""
        p = self.plan(shape)
        a, b, d = p.layouts["a"], p.layouts["b"], p.layouts["d"]
        self.lt.matmul(self.handle, p.desc, self._alpha.ctypes.data, w, a, x, b, self._beta.ctypes.data, y, d, y, d,
                       p.algo if algo is None else algo, self.workspace_ptr, self.workspace_bytes, stream)

    def close(self) -> None:
        for plan in self.plans.values():
            plan.close()
        self.plans.clear()
        self.lt.destroy(self.handle)
