"""The device interface the runtime runs on, and the choice of one.

A `Device` owns memory, copies, kernel launches and (where it has them) graphs. The
plan executor (`runtime.executor`), the sampler and the weight fill use nothing else,
so the same code runs on the host (`backends.cpu.HostDevice`), on a GPU
(`backends.cuda.CudaDevice`) and on the host-memory CUDA double the tests use.
Buffers are opaque to callers: numpy arrays on the host, `DeviceArray`s on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Protocol, Sequence

import numpy as np

from fusec.errors import InputError
from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import Target
from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Node
from fusec.fusion.plan import PlanOptions

# Largest batch (tokens) run through the fused-GEMV plan; past it, library GEMMs win. The
# one default per kind of device, until `fusec autotune` measures it. Host: its GEMVs take
# tiles of 8 token rows (each weight read once a tile), which beat decode-then-numpy-GEMM
# at every batch measured on SmolLM2 (2-core EPYC): q4_1 weights N=32 decode 362 -> 537
# tok/s and a 1024-token prefill step 1250 -> 980 ms; f32 weights N=32 323 -> 437. So the
# host's default is the largest default batch (--max-num-batched-tokens).
HOST_CROSSOVER = 1024
GPU_CROSSOVER = 8


def plan_options(target: Target, max_positions: int, crossover: int | None = None,
                 gpu_shapes: bool | None = None) -> PlanOptions:
    """The plan options a device of this target runs (`fusec compile` builds the same)."""
    gpu = target.is_gpu if gpu_shapes is None else gpu_shapes
    return PlanOptions(target, max_positions=max_positions,
                       crossover=crossover or (GPU_CROSSOVER if gpu else HOST_CROSSOVER), gpu_shapes=gpu)


@dataclass(frozen=True)
class GemmShape:
    tokens: int  # T
    out_features: int  # N
    in_features: int  # K
    dtype: DType  # of x (and of w unless weight_dtype says otherwise)
    out_dtype: DType | None = None  # of y; None: dtype
    weight_format: str | None = None  # w in a block format (kernels/quant.py), decoding to dtype
    weight_dtype: DType | None = None  # of w's elements when not in a block format; None: dtype

    @property
    def w_dtype(self) -> DType:
        return self.weight_dtype or self.dtype

    @property
    def y_dtype(self) -> DType:
        return self.out_dtype or self.dtype

    def layouts(self) -> dict[str, tuple[int, int, int]]:
        """(rows, cols, leading dimension) of the column-major A, B and D (cuBLASLt)."""
        T, N, K = self.tokens, self.out_features, self.in_features
        return {"a": (K, N, K), "b": (K, T, K), "d": (N, T, N)}


@dataclass(frozen=True)
class ExpertGemmShape:
    """Routed experts as GEMMs (moe_matmul): `gemm` is one expert's [N, K] matrix over the
    step's T tokens, w stacks `experts` of them; `slots` per token (x shared by them or
    one K-part each); `combine`: the route-weighted sum over slots, else every slot's output."""

    gemm: GemmShape
    experts: int
    slots: int
    combine: bool


class GemmLibrary(Protocol):
    """y = x @ w.T for one shape on device buffers, prepared once, called per step."""

    def prepare(self, shape: GemmShape, x: Any, w: Any, y: Any) -> Callable[[], None]: ...
    def close(self) -> None: ...


class Device(Protocol):
    kind: str  # "cpu" | "cuda": which engine path (and KV sizing rule) it serves
    target: Target
    supports_graphs: bool
    graph_launch_kinds: frozenset[str]  # the plan launch kinds a captured graph can hold
    graphs_any_step: bool  # capture is cheap enough to run every step of such plans as a graph
    cache: KernelCache

    def activate(self) -> None: ...  # make it usable from the calling thread
    def identity(self) -> str: ...  # what tuned choices are keyed by
    def plan_options(self, max_positions: int, crossover: int | None = None) -> PlanOptions: ...

    # memory
    def buffer(self, shape: Sequence[int], dtype: Any) -> Any: ...
    def zeros(self, shape: Sequence[int], dtype: Any) -> Any: ...  # a zero-filled buffer
    def view(self, buf: Any, shape: Sequence[int], dtype: Any, offset: int = 0) -> Any: ...
    def place_weights(self, nodes: Sequence[Node], weights: Mapping[str, np.ndarray]) -> dict[str, Any]: ...
    def upload(self, buf: Any, host: np.ndarray) -> None: ...
    def upload_rows(self, buf: Any, host: np.ndarray) -> None: ...
    def download(self, buf: Any, count: int) -> np.ndarray: ...
    def to_host(self, buf: Any) -> np.ndarray: ...  # a copy: buffers are reused
    def fill_bytes(self, buf: Any, byte: int) -> None: ...
    def copy(self, dst: Any, src: Any) -> None: ...  # same-size buffers or views
    def memory_info(self) -> tuple[int, int]: ...  # (free, total) bytes

    # work
    def load(self, kernel: Any) -> Any: ...
    def launch_kernel(self, kernel: Any, args: Sequence[Any], grid: tuple[int, int]) -> None: ...
    def prepare_launch(self, kernel: Any, args: Sequence[Any], grid: tuple[int, int]) -> Callable[[], None]: ...
    def gemm_library(self) -> GemmLibrary: ...
    def fill_random(self, buf: Any, dtype: DType, seed: int, stream: int, scale: float, shift: float) -> None: ...
    def step_scope(self) -> ContextManager: ...  # entered around every step
    def sync(self) -> None: ...
    def capture(self, body: Callable[[], None]) -> Any: ...  # only where supports_graphs
    def replay(self, graph: Any) -> None: ...
    def close(self) -> None: ...


def as_i32(v: int) -> np.int32:
    """The low 32 bits of v as a signed kernel argument."""
    return np.array([v & 0xFFFFFFFF], np.uint32).view(np.int32)[0]


def fill_random(device: Device, buf: Any, dtype: DType, seed: int, stream: int, scale: float, shift: float) -> None:
    """Fill buf with the FillRandom kernel's draws (dummy weights, tuning inputs)."""
    from fusec.kernels.random import FillRandom, fill_spans

    kernel = FillRandom(dtype)
    itemsize = np.dtype(dtype.storage).itemsize
    n = int(np.prod(buf.shape))
    for start, count, word in fill_spans(n, stream):
        view = device.view(buf, (count,), dtype.storage, start * itemsize)
        device.launch_kernel(kernel, [view, np.int32(count), as_i32(seed), as_i32(word), np.float32(scale),
                                      np.float32(shift)], kernel.grid({"n": count}))


def cuda_available() -> bool:
    try:
        from cuda.core import Device as CudaCoreDevice

        CudaCoreDevice().set_current()
        return True
    except Exception:  # no cuda-python, no driver, or no device
        return False


def resolve_device(device: str) -> str:
    """"auto" | "cpu" | "cuda" -> the kind to run on."""
    if device == "cpu":
        return "cpu"
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda":
        if not cuda_available():
            raise InputError("no CUDA device found; use --device cpu")
        return "cuda"
    raise InputError(f"unknown device {device!r}; expected auto, cpu or cuda")


def make_device(kind: str, cache: KernelCache | None = None) -> Device:
    """A device of a resolved kind ("cpu" or "cuda")."""
    if kind == "cuda":
        from fusec.runtime.backends.cuda import CudaDevice

        return CudaDevice(cache)
    from fusec.runtime.backends.cpu import HostDevice

    return HostDevice(cache)
