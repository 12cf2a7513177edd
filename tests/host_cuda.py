"""A CudaDevice double for machines without a GPU: "device" memory is host memory and
kernels run their host-target builds. The CUDA executor's own logic (the activation
arena and its views, launch arguments, KV-cache halves and copies, the GEMM calls,
KV sizing from free memory, sampling and the dummy-weight fill on the device) then
runs and is checked on the CPU; only the driver, PTX and cuBLASLt are left to the
GPU tests."""
from __future__ import annotations

import ctypes
import threading
from typing import Any, Sequence

import numpy as np

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import HOST
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import from_storage, round_to, to_storage
from fusec.runtime.backends.cpu import HostDevice
from fusec.runtime.backends.cuda import CudaDevice, DeviceArray

GARBAGE = 0xA5  # fresh "device" memory is not zeroed


def host_view(ptr: int, shape: Sequence[int], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype, count).reshape(shape)


class NumpyGemm:
    """cuBLASLt's role: y = x @ w.T on device pointers."""

    def __init__(self, device: "HostMemoryCuda") -> None:
        self.device = device
        self.shapes: list[Any] = []
        self.tuned: dict[Any, bytes] = {}

    def candidates(self, shape, count: int) -> list[int]:
        return [0, 1][:count]  # two "algorithms", both numpy

    @staticmethod
    def algo_bytes(algo: int) -> bytes:
        return bytes([algo]) * 64

    def prepare(self, shape, x: DeviceArray, w: DeviceArray, y: DeviceArray):
        return lambda: self.matmul(shape, x.ptr, w.ptr, y.ptr, 0)

    def matmul(self, shape, x: int, w: int, y: int, stream: int, algo: int | None = None) -> None:
        if self.device.recording is not None:
            self.device.recording.append(lambda: self.matmul(shape, x, w, y, stream, algo))
            return
        self.shapes.append(shape)
        dt, yt = shape.dtype, shape.y_dtype
        xs = from_storage(host_view(x, (shape.tokens, shape.in_features), dt.storage), dt)
        ws = from_storage(host_view(w, (shape.out_features, shape.in_features), dt.storage), dt)
        out = host_view(y, (shape.tokens, shape.out_features), yt.storage)
        out[...] = to_storage(round_to(xs @ ws.T, yt), yt)

    def prepare_experts(self, shape, x: DeviceArray, route: DeviceArray, w: DeviceArray, y: DeviceArray):
        """The host's grouped expert GEMMs (a plan for the host target has them; a GPU's runs GEMVs)."""
        views = [host_view(a.ptr, a.shape, a.dtype) for a in (x, route, w, y)]
        return self.device.host.gemm_library().prepare_experts(shape, *views)

    def close(self) -> None:
        pass


class HostMemoryCuda(CudaDevice):
    def __init__(self, cache: KernelCache | None = None, total_bytes: int = 4 << 30) -> None:
        self.cache = cache or KernelCache()
        self.target = HOST
        self.stream_handle = 0
        self.host = HostDevice(self.cache, threads=2)
        self.total, self.used = total_bytes, 0
        self.launches = 0
        self.recording: list | None = None  # the "graph" being captured
        self.replays = 0
        self.threads = {threading.get_ident()}  # threads with the "context" current
        self._staging = None  # copies go straight to "device" memory

    def activate(self) -> None:
        self.threads.add(threading.get_ident())

    def _current(self) -> None:
        # the driver's rule: no call without the context current on this thread
        assert threading.get_ident() in self.threads, "CUDA call on a thread without the context current"

    def load(self, kernel) -> Any:
        fn = self.host.linker.kernels.get(kernel.name)
        if fn is None:
            fn = self.host.linker.load(compile_kernel(kernel, HOST, self.cache).data, kernel.name, kernel.params())
        return fn

    def buffer(self, shape: Sequence[int], dtype) -> DeviceArray:
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        mem = np.full(nbytes, GARBAGE, np.uint8)
        self.used += nbytes
        return DeviceArray(mem.ctypes.data, shape, dtype, mem)

    def upload(self, buf: DeviceArray, host: np.ndarray) -> None:
        self._current()
        assert self.recording is None, "a copy from pageable memory cannot be captured in a CUDA graph"
        host = np.ascontiguousarray(host, dtype=buf.dtype)
        if host.nbytes > buf.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit a {buf.nbytes}-byte buffer")
        ctypes.memmove(buf.ptr, host.ctypes.data, host.nbytes)

    def upload_rows(self, buf: DeviceArray, host: np.ndarray) -> None:
        self._current()
        assert self.recording is None, "a copy from pageable memory cannot be captured in a CUDA graph"
        host = np.ascontiguousarray(host, dtype=buf.dtype)
        (r, w), (rows, width) = host.shape, buf.shape
        assert r <= rows and w <= width
        host_view(buf.ptr, buf.shape, buf.dtype)[:r, :w] = host

    def download(self, buf: DeviceArray, count: int) -> np.ndarray:
        self._current()
        return host_view(buf.ptr, (count, *buf.shape[1:]), buf.dtype).copy()

    def fill_bytes(self, buf: DeviceArray, byte: int) -> None:
        self._current()
        ctypes.memset(buf.ptr, byte, buf.nbytes)

    def copy(self, dst: DeviceArray, src: DeviceArray) -> None:
        self._current()
        assert dst.nbytes == src.nbytes
        ctypes.memmove(dst.ptr, src.ptr, dst.nbytes)

    def prepare_launch(self, kernel, args: Sequence[Any], grid: tuple[int, int]):
        values = [a.ptr if isinstance(a, DeviceArray) else a.item() for a in args]
        fn, launcher = self.load(kernel), self.host.launcher

        def call() -> None:
            self._current()
            if self.recording is not None:
                self.recording.append(lambda: launcher.launch(fn, values, grid))
                return
            self.launches += 1
            launcher.launch(fn, values, grid)
        return call

    def capture(self, body) -> list:
        """A "graph": the recorded launches, replayed in order."""
        self.recording = []
        try:
            body()
            return self.recording
        finally:
            self.recording = None

    def replay(self, graph: list) -> None:
        self._current()
        self.replays += 1
        for call in graph:
            call()

    def identity(self) -> str:
        return "host-memory CUDA double"

    def memory_info(self) -> tuple[int, int]:
        return self.total - self.used, self.total

    def sync(self) -> None:
        pass

    def trim(self) -> None:
        pass

    def gemm_library(self) -> NumpyGemm:
        return NumpyGemm(self)
