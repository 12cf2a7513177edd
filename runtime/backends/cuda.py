"""An NVIDIA GPU as a device, through cuda.core.

PTX kernels come from the fusec cache (compiled on demand) and load with
`ObjectCode.from_ptx`; GEMMs go to cuBLASLt; everything is enqueued on one stream, and
decode steps can be captured as CUDA graphs. Weights are uploaded, or filled on the
device by the FillRandom kernel for dummy weights. Imported only on the GPU path;
`cuda.bindings.driver` is used where cuda.core has no call (async copies, memset,
memory info).
"""
from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import Target
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Node
from fusec.fusion.plan import PlanOptions
from fusec.kernels.base import GPU_LANES
from fusec.models.weights import DummyWeights
from fusec.runtime.device import fill_random, plan_options

log = logging.getLogger(__name__)


def _check(result) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    return rest[0] if len(rest) == 1 else rest


class DeviceArray:
    """A typed view of device memory (a pointer, a shape, a storage dtype)."""

    def __init__(self, ptr: int, shape: Sequence[int], dtype, owner: Any = None) -> None:
        self.ptr, self.shape, self.dtype = int(ptr), tuple(int(s) for s in shape), np.dtype(dtype)
        self.owner = owner  # keeps the allocation alive

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def view(self, shape: Sequence[int], dtype=None, offset: int = 0) -> "DeviceArray":
        return DeviceArray(self.ptr + offset, shape, dtype or self.dtype, self if self.owner is None else self.owner)


def device_target(device) -> Target:
    major, _minor = device.compute_capability
    return Target("sm_90" if major >= 9 else "sm_80")


class CudaDevice:
    """The current GPU, one stream, and kernels loaded from the fusec cache."""

    kind = "cuda"
    supports_graphs = True
    graph_launch_kinds = frozenset({"kernel", "gemm"})  # cuBLASLt calls are captured too

    def __init__(self, cache: KernelCache | None = None) -> None:
        from cuda.core import Device

        self.device = Device()
        self.device.set_current()
        self.stream = self.device.create_stream()
        self.stream_handle = int(self.stream.handle)
        self.target = device_target(self.device)
        self.cache = cache or KernelCache()
        self._kernels: dict[str, Any] = {}
        self._in_flight: list[np.ndarray] = []  # host sources of async copies, kept until a sync

    def activate(self) -> None:
        """Make the device's context current on the calling thread: the driver calls
        need it, and the engine steps on a thread of its own."""
        self.device.set_current()

    def load(self, kernel) -> Any:
        from cuda.core import ObjectCode

        loaded = self._kernels.get(kernel)  # by value: hashing a spec is cheaper than naming it
        if loaded is None:
            ptx = compile_kernel(kernel, self.target, self.cache).data
            loaded = self._kernels[kernel] = ObjectCode.from_ptx(ptx).get_kernel(kernel.name)
        return loaded

    def buffer(self, shape: Sequence[int], dtype) -> DeviceArray:
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        buf = self.device.allocate(nbytes, stream=self.stream)
        return DeviceArray(int(buf.handle), shape, dtype, buf)

    def zeros(self, shape: Sequence[int], dtype) -> DeviceArray:
        buf = self.buffer(shape, dtype)
        self.fill_bytes(buf, 0)
        return buf

    @staticmethod
    def view(buf: DeviceArray, shape: Sequence[int], dtype: Any, offset: int = 0) -> DeviceArray:
        return buf.view(shape, dtype, offset)

    def place_weights(self, nodes: Sequence[Node], weights: Mapping[str, np.ndarray]) -> dict[str, DeviceArray]:
        """Weights in device memory: uploaded, or dummy ones drawn on the device."""
        placed = {}
        if isinstance(weights, DummyWeights):
            fills = {name: rest for name, *rest in weights.fills()}
            for node in tqdm(nodes, desc="filling dummy weights", unit="tensor", disable=None, leave=False):
                arr = placed[node.name] = self.buffer(node.type.shape, node.type.dtype.storage)
                _shape, stream, scale, shift = fills[node.name]
                self.fill_random(arr, node.type.dtype, weights.seed, stream, scale, shift)
            return placed
        for node in tqdm(nodes, desc="uploading weights", unit="tensor", disable=None, leave=False):
            arr = placed[node.name] = self.buffer(node.type.shape, node.type.dtype.storage)
            self.upload(arr, weights[node.name])
        return placed

    def upload(self, buf: DeviceArray, host: np.ndarray) -> None:
        """host's bytes into the start of buf (stream-ordered)."""
        from cuda.bindings import driver

        host = np.ascontiguousarray(host, dtype=buf.dtype)
        if host.nbytes > buf.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit a {buf.nbytes}-byte buffer")
        if host.nbytes:
            _check(driver.cuMemcpyHtoDAsync(buf.ptr, host.ctypes.data, host.nbytes, self.stream_handle))
            self._in_flight.append(host)  # a pageable copy may still read it after we return

    def download(self, buf: DeviceArray, count: int) -> np.ndarray:
        """The first `count` rows of buf, after the stream's work so far."""
        from cuda.bindings import driver

        out = np.empty((count, *buf.shape[1:]), buf.dtype)
        if out.nbytes:
            _check(driver.cuMemcpyDtoHAsync(out.ctypes.data, buf.ptr, out.nbytes, self.stream_handle))
        self.sync()
        return out

    def upload_rows(self, buf: DeviceArray, host: np.ndarray) -> None:
        """host [r, w] into the top-left corner of the 2-D buf [R, W] (r <= R, w <= W)."""
        from cuda.bindings import driver

        host = np.ascontiguousarray(host, dtype=buf.dtype)
        (r, w), (R, W) = host.shape, buf.shape
        if r > R or w > W:
            raise ValueError(f"[{r}, {w}] does not fit [{R}, {W}]")
        if not host.nbytes:
            return
        copy = driver.CUDA_MEMCPY2D()
        copy.srcMemoryType = driver.CUmemorytype.CU_MEMORYTYPE_HOST
        copy.srcHost = host.ctypes.data
        copy.srcPitch = w * host.itemsize
        copy.dstMemoryType = driver.CUmemorytype.CU_MEMORYTYPE_DEVICE
        copy.dstDevice = buf.ptr
        copy.dstPitch = W * host.itemsize
        copy.WidthInBytes = w * host.itemsize
        copy.Height = r
        _check(driver.cuMemcpy2DAsync(copy, self.stream_handle))
        self._in_flight.append(host)

    def to_host(self, buf: DeviceArray) -> np.ndarray:
        return self.download(buf, buf.shape[0])

    def fill_bytes(self, buf: DeviceArray, byte: int) -> None:
        from cuda.bindings import driver

        if buf.nbytes:
            _check(driver.cuMemsetD8Async(buf.ptr, byte, buf.nbytes, self.stream_handle))

    def copy(self, dst: DeviceArray, src: DeviceArray) -> None:
        from cuda.bindings import driver

        if dst.nbytes != src.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")
        if dst.nbytes:
            _check(driver.cuMemcpyDtoDAsync(dst.ptr, src.ptr, dst.nbytes, self.stream_handle))

    def prepare_launch(self, kernel, args: Sequence[Any], grid: tuple[int, int]) -> Callable[[], None]:
        """The launch with its configuration and arguments built once."""
        from cuda.core import LaunchConfig, launch

        if grid[0] * grid[1] == 0:
            return lambda: None
        values = [np.uint64(a.ptr) if isinstance(a, DeviceArray) else a for a in args]
        config, fn, stream = LaunchConfig(grid=grid, block=GPU_LANES), self.load(kernel), self.stream
        return lambda: launch(stream, config, fn, *values)

    def launch_kernel(self, kernel, args: Sequence[Any], grid: tuple[int, int]) -> None:
        self.prepare_launch(kernel, args, grid)()

    def fill_random(self, buf: DeviceArray, dtype: DType, seed: int, stream: int, scale: float, shift: float) -> None:
        fill_random(self, buf, dtype, seed, stream, scale, shift)

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes on the device."""
        from cuda.bindings import driver

        free, total = _check(driver.cuMemGetInfo())
        return int(free), int(total)

    def sync(self) -> None:
        self.stream.sync()
        self._in_flight.clear()

    def identity(self) -> str:
        """What tuned choices are keyed by: the GPU, its compute capability, the driver
        and cuBLASLt (a stored algorithm is only valid for the library that chose it)."""
        from cuda.bindings import driver

        major, minor = self.device.compute_capability
        try:
            from nvmath.bindings import cublasLt

            blas = f" cublasLt {cublasLt.get_version()}"
        except ImportError:
            blas = ""
        return f"{self.device.name} sm_{major}{minor} driver {_check(driver.cuDriverGetVersion())}{blas}"

    def step_scope(self) -> ContextManager:
        return contextlib.nullcontext()

    def capture(self, body: Callable[[], None]) -> Any:
        """A CUDA graph of the work `body` enqueues on the stream (no copies from pageable
        memory and no allocations inside). If the body fails, the capture is ended and
        discarded and the body's own error raised, not the one ending it would give."""
        builder = self.stream.create_graph_builder()
        builder.begin_building("thread_local")
        gc_was_on = gc.isenabled()
        gc.disable()  # a collected buffer would be freed on the capturing stream
        try:
            body()
        except BaseException:
            with contextlib.suppress(Exception):
                builder.end_building()
            raise
        finally:
            if gc_was_on:
                gc.enable()
        graph = builder.end_building().complete()
        upload = getattr(graph, "upload", None)  # cuda.core >= 0.3: the first replay then skips it
        if upload is not None:
            upload(self.stream)
        return graph

    def replay(self, graph: Any) -> None:
        graph.launch(self.stream)

    def plan_options(self, max_positions: int, crossover: int | None = None) -> PlanOptions:
        # GPU-shaped kernels whatever the target (the host-memory double runs them on the CPU)
        return plan_options(self.target, max_positions, crossover, gpu_shapes=True)

    def gemm_library(self) -> Any:
        """cuBLASLt with its own workspace, on this device's stream."""
        from fusec.runtime.backends.cublaslt import WORKSPACE_BYTES, CublasLt

        return CublasLt(self.buffer((WORKSPACE_BYTES,), np.uint8), self.stream_handle, WORKSPACE_BYTES)

    def close(self) -> None:
        self.sync()
