"""Executes fused Plans on an NVIDIA GPU through cuda.core.

PTX kernels come from the fusec cache (compiled on demand) and load with
`ObjectCode.from_ptx`; GEMMs of the large-batch plan go to cuBLASLt; everything is
enqueued on one stream. Memory: weights (uploaded, or filled on the device by the
FillRandom kernel for dummy weights), one activation arena holding the graph inputs
and every plan's buffer slots at the largest batch (`runtime.memory`), the sampler's
buffers, then the KV cache. Only the sampled token ids come back each step.
Imported only on the GPU path; `cuda.bindings.driver` is used where cuda.core has no
call (async copies, memset, memory info).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import Target
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.ir import Graph, source_dims
from fusec.fusion.patterns import Registry
from fusec.fusion.plan import Launch, Plan, PlanOptions, build_plans
from fusec.kernels.base import GPU_LANES
from fusec.kernels.random import FillRandom, fill_spans
from fusec.models.weights import DummyWeights
from fusec.runtime.backends.cpu import check_positions
from fusec.runtime.memory import BATCH_DIMS, ArenaLayout, arena_layout

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


def as_i32(v: int) -> np.int32:
    """The low 32 bits of v as a signed kernel argument."""
    return np.array([v & 0xFFFFFFFF], np.uint32).view(np.int32)[0]


def device_target(device) -> Target:
    major, _minor = device.compute_capability
    return Target("sm_90" if major >= 9 else "sm_80")


class CudaDevice:
    """The current GPU, one stream, and kernels loaded from the fusec cache: what the
    sampler and the weight fill need (the KernelDevice protocol)."""

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

    def copy_bytes(self, dst: int, src: int, nbytes: int) -> None:
        from cuda.bindings import driver

        _check(driver.cuMemcpyDtoDAsync(dst, src, nbytes, self.stream_handle))

    def launch_kernel(self, kernel, args: Sequence[Any], grid: tuple[int, int]) -> None:
        from cuda.core import LaunchConfig, launch

        if grid[0] * grid[1] == 0:
            return
        values = [np.uint64(a.ptr) if isinstance(a, DeviceArray) else a for a in args]
        launch(self.stream, LaunchConfig(grid=grid, block=GPU_LANES), self.load(kernel), *values)

    def fill_random(self, buf: DeviceArray, dtype, seed: int, stream: int, scale: float, shift: float) -> None:
        kernel = FillRandom(dtype)
        n = int(np.prod(buf.shape))
        for start, count, word in fill_spans(n, stream):
            view = buf.view((count,), offset=start * buf.dtype.itemsize)
            self.launch_kernel(kernel, [view, np.int32(count), as_i32(seed), as_i32(word), np.float32(scale),
                                        np.float32(shift)],
                               kernel.grid({"n": count}))

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes on the device."""
        from cuda.bindings import driver

        free, total = _check(driver.cuMemGetInfo())
        return int(free), int(total)

    def sync(self) -> None:
        self.stream.sync()
        self._in_flight.clear()

    def identity(self) -> str:
        """What tuned choices are keyed by: the GPU, its compute capability, the driver."""
        from cuda.bindings import driver

        major, minor = self.device.compute_capability
        return f"{self.device.name} sm_{major}{minor} driver {_check(driver.cuDriverGetVersion())}"

    def capture(self, body: Callable[[], None]) -> Any:
        """A CUDA graph of the work `body` enqueues on the stream (no copies from pageable
        memory and no allocations inside)."""
        builder = self.stream.create_graph_builder()
        builder.begin_building("thread_local")
        try:
            body()
        finally:
            graph = builder.end_building().complete()
        return graph

    def replay(self, graph: Any) -> None:
        graph.launch(self.stream)

    def plan_options(self, max_positions: int, crossover: int) -> PlanOptions:
        # GPU-shaped kernels whatever the target (the host-memory double runs them on the CPU)
        return PlanOptions(self.target, max_positions=max_positions, crossover=crossover, gpu_shapes=True)

    def gemm_library(self) -> Any:
        """cuBLASLt with its workspace, for the large-batch plan's GEMMs."""
        from fusec.runtime.backends.cublaslt import WORKSPACE_BYTES, CublasLt

        self._workspace = self.buffer((WORKSPACE_BYTES,), np.uint8)
        return CublasLt(self._workspace.ptr, WORKSPACE_BYTES)


class CudaExecutor:
    """Runs a graph's plans on a CudaDevice. `max_dims` sizes the activation arena up
    front (the engine passes its largest batch); a batch past it grows the arena."""

    def __init__(self, device: CudaDevice, graph: Graph, weights: Mapping[str, np.ndarray], registry: Registry,
                 options: PlanOptions, poison: bool = False, max_dims: Mapping[str, int] | None = None) -> None:
        self.device = device
        self.graph, self.options, self.poison = graph, options, poison
        self._sources = [n for n in graph.nodes() if n.is_source]
        self.plans = build_plans(graph, registry, options)
        kernels = {k.name: k for plan in self.plans.values() for k in plan.kernels()}
        for kernel in tqdm(kernels.values(), desc="loading kernels", unit="kernel", disable=None, leave=False):
            device.load(kernel)
        self.weights = self._place_weights(weights)
        self.constants = {}
        for plan in self.plans.values():
            for name, value in plan.constants.items():
                arr = self.constants[name] = device.buffer(value.shape, value.dtype)
                device.upload(arr, value)
        has_gemm = any(launch.kind == "gemm" for plan in self.plans.values() for launch in plan.launches)
        self.gemm = device.gemm_library() if has_gemm else None
        self.graphs: dict[int, Any] = {}  # decode batch bucket -> captured step
        self._graph_state: int | None = None  # id() of the KV state the graphs write
        self.max_dims: dict[str, int] = {}
        self.layout: ArenaLayout | None = None
        self.arena: DeviceArray | None = None
        self._reserve(max_dims or {})
        device.sync()

    def _place_weights(self, weights: Mapping[str, np.ndarray]) -> dict[str, DeviceArray]:
        placed = {}
        nodes = list(self.graph.nodes("weight"))
        if isinstance(weights, DummyWeights):
            fills = {name: rest for name, *rest in weights.fills()}
            for node in tqdm(nodes, desc="filling dummy weights", unit="tensor", disable=None, leave=False):
                arr = placed[node.name] = self.device.buffer(node.type.shape, node.type.dtype.storage)
                _shape, stream, scale, shift = fills[node.name]
                self.device.fill_random(arr, node.type.dtype, weights.seed, stream, scale, shift)
            return placed
        for node in tqdm(nodes, desc="uploading weights", unit="tensor", disable=None, leave=False):
            arr = placed[node.name] = self.device.buffer(node.type.shape, node.type.dtype.storage)
            self.device.upload(arr, weights[node.name])
        return placed

    def _reserve(self, dims: Mapping[str, int]) -> None:
        """Make the arena hold a batch of these dims (and every dim seen so far)."""
        dims = {k: v for k, v in dims.items() if k in BATCH_DIMS}
        grown = {k: max(v, self.max_dims.get(k, 0)) for k, v in dims.items()}
        grown.update({k: v for k, v in self.max_dims.items() if k not in grown})
        if not grown or (self.arena is not None and grown == self.max_dims):
            return
        try:
            layout = arena_layout(self.graph, self.plans, grown)
        except KeyError:  # dims the graph needs are still unknown: sized on the first run
            return
        self.max_dims, self.layout = grown, layout
        self.graphs.clear()  # they point into the old arena
        self.arena = None  # free the old one first
        self.arena = self.device.buffer((self.layout.size,), np.uint8)
        log.info("activation arena: %.1f MiB for %s", self.layout.size / 2 ** 20, grown)

    def new_state(self, dims: Mapping[str, int]) -> dict[str, DeviceArray]:
        state = {}
        for n in self.graph.nodes("state"):
            arr = state[n.name] = self.device.buffer(n.type.bind(dims), n.type.dtype.storage)
            self.device.fill_bytes(arr, 0)
        return state

    def copy_blocks(self, state: Mapping[str, DeviceArray], pairs) -> None:
        """Copy KV blocks src -> dst in every layer's cache (copy-on-write)."""
        for arr in state.values():
            half = arr.nbytes // 2
            block = half // arr.shape[1]
            for src, dst in pairs:
                for base in (0, half):
                    self.device.copy_bytes(arr.ptr + base + dst * block, arr.ptr + base + src * block, block)

    def close(self) -> None:
        self.device.sync()
        if self.gemm is not None:
            self.gemm.close()
            self.gemm = None

    def plan_for(self, num_tokens: int) -> Plan:
        return self.plans["gemv" if num_tokens <= self.options.crossover else "gemm"]

    def run(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, DeviceArray]) -> dict[str, DeviceArray]:
        """Enqueue one step; the outputs are device views valid until the next run. A
        decode step replays the captured graph of the smallest bucket that holds it."""
        bucket = self._graph_bucket(inputs, state)
        tables = inputs.get("block_tables")
        if bucket is not None:
            rows = len(inputs["context_lens"])
            inputs = pad_decode_inputs(inputs, bucket, self.max_dims["B"], tables=False)
        dims = source_dims(self._sources, inputs, state, self.weights)
        check_positions(inputs, self.options.max_positions)
        self._reserve(dims)
        plan = self.plan_for(dims["T"])
        values = self._values(plan, dims, state)
        for node in self.graph.nodes("input"):
            if bucket is not None and node.name == "block_tables":
                # only the real rows' used columns: the rest holds block ids written before
                # (zeros at capture), valid for padding rows and never read for real ones
                self.device.upload_rows(values[node.name], tables)
            else:
                self.device.upload(values[node.name], inputs[node.name])
        if bucket is not None:
            self.device.replay(self.graphs[bucket])
            return {name: _rows(values[plan.resolve(name)], rows) for name in self.graph.outputs}
        if self.poison:
            for value in plan.slots:
                self.device.fill_bytes(values[value], 0xFF)  # NaN in f32, f16 and bf16
        self._launch_all(plan, dims, values)
        return {name: values[plan.resolve(name)] for name in self.graph.outputs}

    def capture_graphs(self, buckets: Sequence[int], state: Mapping[str, DeviceArray]) -> list[int]:
        """Capture the decode step of each bucket size (batches padded up to it). Returns
        the buckets captured: those the arena holds."""
        self.graphs.clear()
        self._graph_state = id(state)
        nb = state[next(iter(state))].shape[1] if state else 0
        for bucket in buckets:
            if bucket > self.max_dims.get("S", 0):
                continue
            inputs = pad_decode_inputs(_empty_decode(), bucket, self.max_dims["B"])
            dims = source_dims(self._sources, inputs, state, self.weights)
            plan = self.plan_for(bucket)
            values = self._values(plan, dims, state)
            for node in self.graph.nodes("input"):
                self.device.upload(values[node.name], inputs[node.name])
            self._launch_all(plan, dims, values)  # eager first: library plans and lazy init outside capture
            self.device.sync()
            self.graphs[bucket] = self.device.capture(lambda: self._launch_all(plan, dims, values))
        self.device.sync()
        log.info("captured decode graphs for batch sizes %s (%d KV blocks)", sorted(self.graphs), nb)
        return sorted(self.graphs)

    def _graph_bucket(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, DeviceArray]) -> int | None:
        if not self.graphs or id(state) != self._graph_state:
            return None
        rows = len(inputs["context_lens"])
        if len(inputs["token_ids"]) != rows or len(inputs["logits_indices"]) != rows:
            return None  # not a pure decode step (a prefill chunk, or all logits)
        if inputs["block_tables"].shape[1] > self.max_dims["B"]:
            return None
        return min((b for b in self.graphs if b >= rows), default=None)

    def _values(self, plan: Plan, dims: Mapping[str, int], state: Mapping[str, DeviceArray]) -> dict[str, DeviceArray]:
        """Every value of the plan at these dims: weights, state, and arena views."""
        values: dict[str, DeviceArray] = dict(self.weights)
        values.update(state)
        for node in self.graph.nodes("input"):
            values[node.name] = self.arena.view(node.type.bind(dims), node.type.dtype.storage,
                                                self.layout.inputs[node.name])
        for value, slot in plan.slots.items():
            t = self.graph.node(value).type
            values[value] = self.arena.view(t.bind(dims), t.dtype.storage, self.layout.slots[(plan.bucket, slot)])
        return values

    def _launch_all(self, plan: Plan, dims: Mapping[str, int], values: Mapping[str, DeviceArray]) -> None:
        for launch in plan.launches:
            if launch.kind == "gemm":
                self._gemm(plan, launch, values)
            elif launch.kind == "kernel":
                self._launch(plan, launch, dims, values)
            else:
                raise NotImplementedError(f"{launch.name}: {launch.kind} launches run on the host only")

    def _gemm(self, plan: Plan, launch: Launch, values: Mapping[str, DeviceArray]) -> None:
        from fusec.runtime.backends.cublaslt import GemmShape

        x_name, w_name = (a.name for a in launch.args)
        (out,) = launch.outputs
        x, w, y = values[plan.resolve(x_name)], values[w_name], values[plan.resolve(out)]
        x_dtype, w_dtype, y_dtype = (self.graph.node(n).type.dtype for n in (x_name, w_name, out))
        if x_dtype is not w_dtype:
            raise NotImplementedError(f"{launch.name}: a GEMM of {x_dtype.value} by {w_dtype.value}")
        shape = GemmShape(x.shape[0], w.shape[0], w.shape[1], x_dtype, y_dtype)
        if shape.tokens:
            self.gemm.matmul(shape, x.ptr, w.ptr, y.ptr, self.device.stream_handle)

    def _launch(self, plan: Plan, launch: Launch, dims: Mapping[str, int], values: Mapping[str, DeviceArray]) -> None:
        args: list[Any] = []
        for a in launch.args:
            if a.kind == "dim":
                args.append(np.int32(dims[a.name]))
            elif a.kind == "const":
                args.append(self.constants[a.name])
            else:
                arr = values[plan.resolve(a.name)]
                args.append(arr.view(arr.shape, offset=arr.nbytes // 2) if a.kind == "v_cache" else arr)
        kernel = launch.kernel
        self.device.launch_kernel(kernel, args, kernel.grid({k: dims[v] for k, v in launch.grid_dims.items()}))


def _rows(arr: DeviceArray, rows: int) -> DeviceArray:
    return arr.view((rows, *arr.shape[1:]))


def _empty_decode() -> dict[str, np.ndarray]:
    return {"token_ids": np.zeros(0, np.int32), "positions": np.zeros(0, np.int32),
            "slot_mapping": np.zeros(0, np.int32), "block_tables": np.zeros((0, 1), np.int32),
            "context_lens": np.zeros(0, np.int32), "query_start_loc": np.zeros(1, np.int32),
            "logits_indices": np.zeros(0, np.int32)}


def pad_decode_inputs(inputs: Mapping[str, np.ndarray], bucket: int, width: int,
                      tables: bool = True) -> dict[str, np.ndarray]:
    """A decode batch (one token per sequence) padded to `bucket` sequences and block
    tables `width` wide. Padding rows write no KV (slot -1), attend to one key (of
    block 0, or of whatever block id their table row last held), and their logits are
    never read."""
    rows = len(inputs["context_lens"])
    pad = bucket - rows

    def grow(name: str, fill: int) -> np.ndarray:
        return np.concatenate([np.asarray(inputs[name], np.int32), np.full(pad, fill, np.int32)])

    if tables:
        table = np.zeros((bucket, width), np.int32)
        given = np.asarray(inputs["block_tables"], np.int32)
        table[:rows, :given.shape[1]] = given
    else:  # only its shape is needed (the caller uploads the given rows): no allocation
        table = np.broadcast_to(np.int32(0), (bucket, width))
    return {"token_ids": grow("token_ids", 0), "positions": grow("positions", 0),
            "slot_mapping": grow("slot_mapping", -1), "block_tables": table,
            "context_lens": grow("context_lens", 1), "query_start_loc": np.arange(bucket + 1, dtype=np.int32),
            "logits_indices": np.arange(bucket, dtype=np.int32)}
