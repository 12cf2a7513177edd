"""The host as a device: numpy buffers, host-JIT kernels launched over fusec's threads,
numpy GEMMs split over the same threads."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.host import HostLauncher, HostLinker
from fusec.fusion.codegen.target import HOST
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType, from_storage, round_to, to_storage
from fusec.fusion.ir import Node
from fusec.fusion.plan import PlanOptions
from fusec.runtime.device import GemmShape, fill_random, plan_options

log = logging.getLogger(__name__)


def _bytes(arr: np.ndarray) -> np.ndarray:
    """A contiguous array's memory as a flat uint8 view."""
    return arr.reshape(-1).view(np.uint8)


class HostDevice:
    """Host-JIT kernels over CPU threads, on numpy buffers."""

    kind = "cpu"
    target = HOST
    supports_graphs = False

    def __init__(self, cache: KernelCache | None = None, threads: int | None = None) -> None:
        self.cache = cache or KernelCache()
        self.linker = HostLinker()
        self.launcher = HostLauncher(threads or os.cpu_count() or 1)
        self._blas = None

    def activate(self) -> None:
        """Any thread may launch host kernels."""

    def identity(self) -> str:
        return f"host {HOST.cpu} x{self.launcher.threads}"

    def plan_options(self, max_positions: int, crossover: int | None = None) -> PlanOptions:
        # scalar loads and one attention head a block: measured faster on the host
        return plan_options(HOST, max_positions, crossover, gpu_shapes=False)

    # -- memory ---------------------------------------------------------------------------
    def buffer(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        return np.empty(tuple(shape), dtype)

    @staticmethod
    def view(buf: np.ndarray, shape: Sequence[int], dtype: Any, offset: int = 0) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        return _bytes(buf)[offset:offset + count * dtype.itemsize].view(dtype).reshape(tuple(shape))

    @staticmethod
    def place_weights(nodes: Sequence[Node], weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The host runs on the arrays as loaded (memory-mapped where the loader maps them)."""
        return {n.name: np.ascontiguousarray(weights[n.name]) for n in nodes}

    @staticmethod
    def upload(buf: np.ndarray, host: np.ndarray) -> None:
        """host's elements into the start of buf."""
        host = np.asarray(host, buf.dtype).reshape(-1)
        buf.reshape(-1)[: host.size] = host

    @staticmethod
    def upload_rows(buf: np.ndarray, host: np.ndarray) -> None:
        """host [r, w] into the top-left corner of the 2-D buf."""
        r, w = host.shape
        buf[:r, :w] = host

    @staticmethod
    def download(buf: np.ndarray, count: int) -> np.ndarray:
        return buf[:count].copy()

    @staticmethod
    def to_host(buf: np.ndarray) -> np.ndarray:
        return buf.copy()

    @staticmethod
    def fill_bytes(buf: np.ndarray, byte: int) -> None:
        _bytes(buf).fill(byte)

    @staticmethod
    def copy(dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(_bytes(dst), _bytes(src))

    @staticmethod
    def memory_info() -> tuple[int, int]:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * size, pages * size

    # -- work -----------------------------------------------------------------------------
    def load(self, kernel: Any) -> Any:
        fn = self.linker.kernels.get(kernel.name)
        if fn is None:
            fn = self.linker.load(compile_kernel(kernel, HOST, self.cache).data, kernel.name, kernel.params())
        return fn

    def prepare_launch(self, kernel: Any, args: Sequence[Any], grid: tuple[int, int]) -> Callable[[], None]:
        values = [a.ctypes.data if isinstance(a, np.ndarray) and a.ndim else a.item() for a in args]
        fn, launcher = self.load(kernel), self.launcher
        return lambda: launcher.launch(fn, values, grid)

    def launch_kernel(self, kernel: Any, args: Sequence[Any], grid: tuple[int, int]) -> None:
        self.prepare_launch(kernel, args, grid)()

    def gemm_library(self) -> "HostGemm":
        return HostGemm(self.launcher)

    def fill_random(self, buf: np.ndarray, dtype: DType, seed: int, stream: int, scale: float, shift: float) -> None:
        fill_random(self, buf, dtype, seed, stream, scale, shift)

    def step_scope(self) -> ContextManager:
        """Around a step: BLAS at one thread while our GEMMs split the work over our own
        threads; the rest of the process keeps its BLAS threads."""
        if self._blas is None:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()  # scans the loaded libraries once
        return self._blas.limit(limits=1, user_api="blas")

    def sync(self) -> None:
        """Launches return when done: nothing is in flight."""

    def capture(self, body: Callable[[], None]) -> Any:
        raise NotImplementedError("the host has no graphs: its steps are prepared calls already")

    def replay(self, graph: Any) -> None:
        raise NotImplementedError("the host has no graphs")

    def close(self) -> None:
        self.launcher.close()


class HostGemm:
    """y = x @ w.T with the output columns split over the launcher's threads. BLAS runs
    one thread inside each part (HostDevice.step_scope caps it), so no BLAS worker spins
    against the kernels' threads."""

    def __init__(self, launcher: HostLauncher) -> None:
        self.launcher = launcher
        self._f32: dict[int, np.ndarray] = {}  # float32 copies of f16/bf16 weights, made once

    def _weight(self, w: np.ndarray, dtype: DType) -> np.ndarray:
        if dtype is DType.F32:
            return w
        key = w.ctypes.data
        if key not in self._f32:
            self._f32[key] = np.ascontiguousarray(from_storage(w, dtype), dtype=np.float32)
        return self._f32[key]

    def prepare(self, shape: GemmShape, x: np.ndarray, w: np.ndarray, y: np.ndarray) -> Callable[[], None]:
        x_dtype, y_dtype = shape.dtype, shape.y_dtype
        wf = self._weight(w, shape.dtype)
        xf = x if x_dtype is DType.F32 else np.empty(x.shape, np.float32)
        threads = self.launcher.threads
        n = wf.shape[0]
        bounds = [n * i // threads for i in range(threads + 1)]
        # (w_part @ x.T).T: BLAS then streams the big weight once and packs only the small
        # activation block; x @ w_part.T would pack (copy) the whole weight slice first
        parts = [(wf[a:b], np.empty((b - a, x.shape[0]), np.float32), a, b)
                 for a, b in zip(bounds, bounds[1:]) if b > a]

        def part(wp: np.ndarray, yp: np.ndarray, a: int, b: int) -> Callable[[], None]:
            def run() -> None:
                np.matmul(wp, xf.T, out=yp)
                y[:, a:b] = yp.T if y_dtype is DType.F32 else to_storage(round_to(yp.T, y_dtype), y_dtype)
            return run

        tasks = [part(*p) for p in parts]

        def gemm() -> None:
            if xf is not x:
                np.copyto(xf, from_storage(x, x_dtype))
            self.launcher.parallel(tasks)
        return gemm

    def close(self) -> None:
        self._f32.clear()
