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


def check_driver(result) -> Any:
    """The values of a cuda-bindings call (err, *values), raising on an error."""
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


class Staging:
    """Page-locked host memory that a step's small copies go through. An async copy from
    pageable memory may wait for the stream's earlier work (CUDA's "API synchronization
    behavior"), so a sampler upload would wait for the whole forward; from pinned memory
    it is queued like a kernel. Space is handed out in order and reclaimed when the
    stream is synchronized (nothing queued can still read it then)."""

    ALIGN = 64

    def __init__(self, memory: np.ndarray) -> None:
        self.memory = memory  # uint8, page-locked on a GPU
        self.used = 0

    @property
    def capacity(self) -> int:
        return len(self.memory)

    def reserve(self, nbytes: int) -> int | None:
        """The offset of nbytes of free staging, or None when they do not fit before a reset."""
        start = -(-self.used // self.ALIGN) * self.ALIGN
        if start + nbytes > self.capacity:
            return None
        self.used = start + nbytes
        return start

    def write(self, start: int, host: np.ndarray) -> int:
        """host's bytes (C-contiguous) copied in at a reserved offset: their address."""
        self.memory[start:start + host.nbytes] = host.reshape(-1).view(np.uint8)
        return self.memory.ctypes.data + start

    def read(self, start: int, out: np.ndarray) -> np.ndarray:
        """out (C-contiguous) filled from the staging at a reserved offset."""
        out.reshape(-1).view(np.uint8)[:] = self.memory[start:start + out.nbytes]
        return out

    def reset(self) -> None:
        self.used = 0


def pinned_array(nbytes: int) -> np.ndarray:
    """nbytes of page-locked host memory as a uint8 array (freed with cuMemFreeHost)."""
    import ctypes

    from cuda.bindings import driver

    ptr = int(check_driver(driver.cuMemHostAlloc(nbytes, 0)))
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), np.uint8)


def device_target(device) -> Target:
    major, _minor = device.compute_capability
    return Target("sm_90" if major >= 9 else "sm_80")


class CudaDevice:
    """The current GPU, one stream, and kernels loaded from the fusec cache."""

    kind = "cuda"
    supports_graphs = True
    graph_launch_kinds = frozenset({"kernel", "gemm"})  # cuBLASLt calls are captured too
    graphs_any_step = False  # instantiating a CUDA graph costs more than a prefill's launches save

    def __init__(self, cache: KernelCache | None = None) -> None:
        from cuda.core import Device

        self.device = Device()
        self.device.set_current()
        self.stream = self.device.create_stream()
        self.stream_handle = int(self.stream.handle)
        self.target = device_target(self.device)
        self.cache = cache or KernelCache()
        self._kernels: dict[str, Any] = {}
        self._in_flight: list[np.ndarray] = []  # pageable sources of async copies, kept until a sync
        self._staging: Staging | None = None  # made on first use, freed by close()

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

    STAGING_BYTES = 8 << 20  # a step's inputs and sampler arrays, many times over

    def staging(self) -> Staging:
        if self._staging is None:
            self._staging = Staging(pinned_array(self.STAGING_BYTES))
        return self._staging

    def _reserve(self, nbytes: int) -> int | None:
        """An offset of nbytes in the staging, waiting for the copies queued from it when
        it is full; None for what is larger than the staging (weights), which is copied
        from pageable memory."""
        staging = self.staging()
        if nbytes > staging.capacity:
            return None
        start = staging.reserve(nbytes)
        if start is None:
            self.sync()
            start = staging.reserve(nbytes)
        return start

    def _source(self, host: np.ndarray) -> int:
        """The address an async copy of host (C-contiguous) reads: a pinned copy of it, or
        host itself, kept until a sync."""
        start = self._reserve(host.nbytes)
        if start is None:
            self._in_flight.append(host)
            return host.ctypes.data
        return self.staging().write(start, host)

    def upload(self, buf: DeviceArray, host: np.ndarray) -> None:
        """host's bytes into the start of buf (stream-ordered)."""
        from cuda.bindings import driver

        host = np.ascontiguousarray(host, dtype=buf.dtype)
        if host.nbytes > buf.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit a {buf.nbytes}-byte buffer")
        if host.nbytes:
            check_driver(driver.cuMemcpyHtoDAsync(buf.ptr, self._source(host), host.nbytes, self.stream_handle))

    def download(self, buf: DeviceArray, count: int) -> np.ndarray:
        """The first `count` rows of buf, after the stream's work so far."""
        from cuda.bindings import driver

        out = np.empty((count, *buf.shape[1:]), buf.dtype)
        if not out.nbytes:
            return out
        start = self._reserve(out.nbytes)
        if start is None:
            check_driver(driver.cuMemcpyDtoHAsync(out.ctypes.data, buf.ptr, out.nbytes, self.stream_handle))
            self.sync()
            return out
        staging = self.staging()
        check_driver(driver.cuMemcpyDtoHAsync(staging.memory.ctypes.data + start, buf.ptr, out.nbytes,
                                              self.stream_handle))
        self.stream.sync()
        staging.read(start, out)
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
        copy.srcHost = self._source(host)
        copy.srcPitch = w * host.itemsize
        copy.dstMemoryType = driver.CUmemorytype.CU_MEMORYTYPE_DEVICE
        copy.dstDevice = buf.ptr
        copy.dstPitch = W * host.itemsize
        copy.WidthInBytes = w * host.itemsize
        copy.Height = r
        check_driver(driver.cuMemcpy2DAsync(copy, self.stream_handle))

    def to_host(self, buf: DeviceArray) -> np.ndarray:
        return self.download(buf, buf.shape[0])

    def fill_bytes(self, buf: DeviceArray, byte: int) -> None:
        from cuda.bindings import driver

        if buf.nbytes:
            check_driver(driver.cuMemsetD8Async(buf.ptr, byte, buf.nbytes, self.stream_handle))

    def copy(self, dst: DeviceArray, src: DeviceArray) -> None:
        from cuda.bindings import driver

        if dst.nbytes != src.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")
        if dst.nbytes:
            check_driver(driver.cuMemcpyDtoDAsync(dst.ptr, src.ptr, dst.nbytes, self.stream_handle))

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
        """(free, total) bytes on the device. cuda.core's memory pool keeps what is freed
        reserved (its release threshold is the maximum) and the driver counts that as
        used; it is free to this process's allocations, so it is counted free here."""
        from cuda.bindings import driver

        free, total = check_driver(driver.cuMemGetInfo())
        attributes = getattr(self.device.memory_resource, "attributes", None)
        if attributes is not None:
            free += attributes.reserved_mem_current - attributes.used_mem_current
        return int(free), int(total)

    def trim(self) -> None:
        """Give the pool's reserved but unused memory back to the driver, for other
        processes and libraries (torch's allocator does not draw on this pool)."""
        from cuda.bindings import driver

        handle = getattr(self.device.memory_resource, "handle", None)
        if handle is not None:
            check_driver(driver.cuMemPoolTrimTo(handle, 0))

    def sync(self) -> None:
        self.stream.sync()
        self._in_flight.clear()
        if self._staging is not None:
            self._staging.reset()

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
        return f"{self.device.name} sm_{major}{minor} driver {check_driver(driver.cuDriverGetVersion())}{blas}"

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
        if self._staging is not None:
            from cuda.bindings import driver

            check_driver(driver.cuMemFreeHost(self._staging.memory.ctypes.data))
            self._staging = None
        gc.collect()  # buffers only this engine held go back to the pool, then to the driver
        self.trim()
