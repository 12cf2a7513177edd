"""The host as a device: numpy buffers, host-JIT kernels launched over fusec's threads,
numpy GEMMs split over the same threads."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.host import HostKernel, HostLauncher, HostLinker, split
from fusec.fusion.codegen.host_graph import HostCall, HostGraph, HostProgram, signature
from fusec.fusion.codegen.target import HOST
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType, from_storage, round_to, to_storage
from fusec.fusion.ir import Node
from fusec.fusion.plan import PlanOptions
from fusec.kernels.elementwise import Embed
from fusec.runtime.device import ExpertGemmShape, GemmShape, fill_random, plan_options

log = logging.getLogger(__name__)


def _bytes(arr: np.ndarray) -> np.ndarray:
    """A contiguous array's memory as a flat uint8 view."""
    return arr.reshape(-1).view(np.uint8)


class HostDevice:
    """Host-JIT kernels over CPU threads, on numpy buffers."""

    kind = "cpu"
    target = HOST
    supports_graphs = True
    graph_launch_kinds = frozenset({"kernel"})  # library GEMMs and numpy ops run in Python
    graphs_any_step = True  # a capture compiles nothing new for a known launch sequence

    def __init__(self, cache: KernelCache | None = None, threads: int | None = None) -> None:
        self.cache = cache or KernelCache()
        self.linker = HostLinker()
        self.launcher = HostLauncher(threads or os.cpu_count() or 1)
        self._blas = None
        self.recording: list[HostCall] | None = None  # launches recorded during a capture
        self._programs: dict[tuple, HostProgram] = {}  # by launch sequence (host_graph.signature)

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
    def zeros(shape: Sequence[int], dtype: Any) -> np.ndarray:
        """Zeroed on first touch (calloc'd pages): a large KV cache costs memory only as it fills."""
        return np.zeros(tuple(shape), dtype)

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
        values = tuple(a.ctypes.data if isinstance(a, np.ndarray) and a.ndim else a.item() for a in args)
        call = HostCall(self.load(kernel), tuple(p.kind for p in kernel.params()), values, grid)
        launcher = self.launcher

        def launch() -> None:
            if self.recording is not None:
                self.recording.append(call)
            else:
                launcher.launch(call.kernel, call.values, call.grid)
        return launch

    def launch_kernel(self, kernel: Any, args: Sequence[Any], grid: tuple[int, int]) -> None:
        self.prepare_launch(kernel, args, grid)()

    def gemm_library(self) -> "HostGemm":
        return HostGemm(self.launcher, self.load)

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

    def capture(self, body: Callable[[], None]) -> HostGraph:
        """The kernel launches `body` makes, recorded (not run) as a table for the native
        step that runs that launch sequence (fusion/codegen/host_graph.py), compiled on
        its first capture. Only kernel launches can be captured (`graph_launch_kinds`)."""
        self.recording = []
        try:
            body()
            calls = self.recording
        finally:
            self.recording = None
        key = signature(calls)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = HostProgram(calls, self.launcher.threads)
        return HostGraph(calls, self.launcher, program)

    @staticmethod
    def replay(graph: HostGraph) -> None:
        graph.replay()

    def close(self) -> None:
        self.launcher.close()


class HostGemm:
    """y = x @ w.T with the output columns split over the launcher's threads. BLAS runs
    one thread inside each part (HostDevice.step_scope caps it), so no BLAS worker spins
    against the kernels' threads.

    A block-quantized, f16 or bf16 w is never expanded whole: each thread decodes tiles
    of its rows (TILE_BYTES of float32, cache-sized) with the embedding-gather kernel and
    multiplies each tile as it is made. Tiles and partial outputs live in one scratch per
    thread slot, shared by every prepared GEMM (steps never overlap), so memory does not
    grow with the number of GEMMs."""

    TILE_BYTES = 1 << 20

    def __init__(self, launcher: HostLauncher, load: Callable[[Any], HostKernel]) -> None:
        self.launcher = launcher
        self.load = load
        self._row_ids: np.ndarray = np.zeros(0, np.int32)  # 0, 1, 2, ...: tiles' row ids
        self._scratch: dict[tuple[int, str], np.ndarray] = {}  # (part, use) -> float32

    @staticmethod
    def decoder(k: int, weight_format: str | None, dtype: DType = DType.F32) -> Embed:
        """The kernel that decodes rows of a [N, k] weight (in a block format, or of
        f16 / bf16 elements) into float32."""
        return Embed(cols=k, table=DType.F32 if weight_format else dtype, out=DType.F32, table_format=weight_format)

    def _buffer(self, part: int, use: str, shape: tuple[int, int]) -> np.ndarray:
        """Part `part`'s scratch for `use`, grown to hold `shape` (made when prepared)."""
        size = shape[0] * shape[1]
        buf = self._scratch.get((part, use))
        if buf is None or buf.size < size:
            buf = self._scratch[(part, use)] = np.empty(size, np.float32)
        return buf

    def prepare(self, shape: GemmShape, x: np.ndarray, w: np.ndarray, y: np.ndarray) -> Callable[[], None]:
        x_dtype, y_dtype = shape.dtype, shape.y_dtype
        tokens, n, k = x.shape[0], shape.out_features, shape.in_features
        xf = x if x_dtype is DType.F32 else np.empty(x.shape, np.float32)
        decoded = shape.weight_format is not None or shape.w_dtype is not DType.F32
        if decoded:
            decode = self.load(self.decoder(k, shape.weight_format, shape.w_dtype)).fn
            if len(self._row_ids) < n:
                self._row_ids = np.arange(n, dtype=np.int32)
            ids = self._row_ids  # held here: a longer one may replace it later
            chunk = max(1, self.TILE_BYTES // (4 * k))
        else:
            chunk = n
        parts = split(n, self.launcher.threads)
        for p, (a, b) in enumerate(parts):  # scratch sized now, not inside a step
            self._buffer(p, "out", (min(chunk, b - a), tokens))
            if decoded:
                self._buffer(p, "tile", (min(chunk, b - a), k))

        # (w_rows @ x.T).T: BLAS then streams the weight rows once and packs only the
        # small activation block; x @ w_rows.T would pack (copy) the weight rows first
        def part(p: int, a: int, b: int) -> Callable[[], None]:
            def run() -> None:
                out_buf = self._scratch[(p, "out")]
                for lo in range(a, b, chunk):
                    rows = min(chunk, b - lo)
                    if decoded:
                        tile = self._scratch[(p, "tile")][:rows * k].reshape(rows, k)
                        decode(ids.ctypes.data + 4 * lo, w.ctypes.data, tile.ctypes.data, rows, rows, 0, rows)
                    else:
                        tile = w[lo:lo + rows]
                    out = out_buf[:rows * tokens].reshape(rows, tokens)
                    np.matmul(tile, xf.T, out=out)
                    y[:, lo:lo + rows] = out.T if y_dtype is DType.F32 else to_storage(round_to(out.T, y_dtype), y_dtype)
            return run

        tasks = [part(p, a, b) for p, (a, b) in enumerate(parts)]

        def gemm() -> None:
            if xf is not x:
                np.copyto(xf, from_storage(x, x_dtype))
            self.launcher.parallel(tasks)
        return gemm

    def prepare_experts(self, shape: ExpertGemmShape, x: np.ndarray, route: np.ndarray, w: np.ndarray,
                        y: np.ndarray) -> Callable[[], None]:
        """moe_matmul over a batch: the (token, slot) pairs grouped by the expert the router
        gave them, each expert's rows gathered into one GEMM (its matrix read and decoded
        once, not once per token), experts shared out over the threads. Only experts some
        token picked are touched."""
        g = shape.gemm
        n, k, experts, slots = g.out_features, g.in_features, shape.experts, shape.slots
        decoded = g.weight_format is not None or g.w_dtype is not DType.F32
        decode = self.load(self.decoder(k, g.weight_format, g.w_dtype)).fn if decoded else None
        if decoded and len(self._row_ids) < experts * n:
            self._row_ids = np.arange(experts * n, dtype=np.int32)
        ids_all = self._row_ids
        threads = self.launcher.threads
        for p in range(threads):  # sized now, not inside a step
            self._buffer(p, "expert", (n, k) if decoded else (0, 0))
            if shape.combine:
                self._buffer(p, "combined", (x.shape[0], n))
        per_slot = x.shape[1] == slots * k

        def matrix(p: int, e: int) -> np.ndarray:
            if not decoded:
                return w[e * n:(e + 1) * n]
            tile = self._scratch[(p, "expert")][:n * k].reshape(n, k)
            decode(ids_all.ctypes.data + 4 * e * n, w.ctypes.data, tile.ctypes.data, n, n, 0, n)
            return tile

        def experts_gemm() -> None:
            tokens = x.shape[0]
            # corrupt ids read an expert in range, as the kernels': below 0 the first, past the end (or NaN) the last
            ids = np.nan_to_num(np.asarray(route[:, :slots], np.float64), nan=experts - 1)
            chosen = np.clip(ids, 0, experts - 1).astype(np.int64).ravel()
            weights = np.asarray(route[:, slots:2 * slots], np.float32).ravel()
            xf = from_storage(x, g.dtype).reshape(tokens * slots if per_slot else tokens, k)
            order = np.argsort(chosen, kind="stable")
            used, starts = np.unique(chosen[order], return_index=True)
            groups = np.split(order, starts[1:])  # the (token * slots + slot) pairs of each used expert
            share: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(threads)]
            load = [0] * threads
            for e, pairs in sorted(zip(used.tolist(), groups), key=lambda eg: -len(eg[1])):
                p = load.index(min(load))  # the least-loaded thread takes the next largest expert
                share[p].append((e, pairs))
                load[p] += len(pairs) + 8  # a matrix read costs like a few rows
            out = None if shape.combine else np.empty((tokens * slots, n), np.float32)

            def part(p: int) -> Callable[[], None]:
                def run() -> None:
                    acc = self._scratch[(p, "combined")][:tokens * n].reshape(tokens, n) if shape.combine else None
                    if acc is not None:
                        acc.fill(0.0)
                    for e, pairs in share[p]:
                        ys = (xf[pairs] if per_slot else xf[pairs // slots]) @ matrix(p, e).T
                        if acc is None:
                            out[pairs] = ys
                            continue
                        rows, ys = pairs // slots, ys * weights[pairs, None]
                        if len(np.unique(rows)) == len(rows):  # the router picks an expert once a token
                            acc[rows] += ys
                        else:  # a corrupt route picked it twice: both count
                            np.add.at(acc, rows, ys)
                return run

            active = [p for p in range(threads) if share[p]]
            self.launcher.parallel([part(p) for p in active])
            if shape.combine:
                result = np.zeros((tokens, n), np.float32)
                for p in active:
                    result += self._scratch[(p, "combined")][:tokens * n].reshape(tokens, n)
            else:
                result = out.reshape(tokens, slots * n)
            y[...] = result if g.y_dtype is DType.F32 else to_storage(round_to(result, g.y_dtype), g.y_dtype)
        return experts_gemm

    def close(self) -> None:
        self._scratch.clear()
