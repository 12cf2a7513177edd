"""Executes fused Plans on the CPU: host-JIT kernels over threads, numpy GEMMs."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from threadpoolctl import threadpool_limits

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.host import HostLauncher, HostLinker
from fusec.fusion.codegen.target import HOST
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType, from_storage, round_to, to_storage
from fusec.fusion.ir import Graph, source_dims
from fusec.fusion.ops import OPS
from fusec.fusion.patterns import Registry
from fusec.fusion.plan import Launch, Plan, PlanOptions, build_plans

log = logging.getLogger(__name__)
POISON = {DType.F32: np.float32(np.nan), DType.F16: np.float16(np.nan), DType.BF16: np.uint16(0x7FC0),
          DType.I32: np.int32(-(2 ** 31))}


def check_positions(inputs: Mapping[str, np.ndarray], max_positions: int) -> None:
    """RoPE kernels index a cos/sin table of max_positions rows."""
    pos = inputs.get("positions")
    if pos is not None and len(pos) and (int(np.min(pos)) < 0 or int(np.max(pos)) >= max_positions):
        raise ValueError(f"positions must be in [0, {max_positions})")


class HostDevice:
    """Host-JIT kernels launched over CPU threads, on numpy buffers: what the sampler
    and the dummy-weight fill need from a device (the KernelDevice protocol)."""

    def __init__(self, cache: KernelCache | None = None, threads: int | None = None) -> None:
        self.cache = cache or KernelCache()
        self.linker = HostLinker()
        self.launcher = HostLauncher(threads or os.cpu_count() or 1)

    def buffer(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    @staticmethod
    def upload(buf: np.ndarray, host: np.ndarray) -> None:
        """host's elements into the start of buf."""
        host = np.asarray(host, buf.dtype).reshape(-1)
        buf.reshape(-1)[: host.size] = host

    @staticmethod
    def download(buf: np.ndarray, count: int) -> np.ndarray:
        """The first `count` rows of buf."""
        return buf[:count].copy()

    @staticmethod
    def to_host(buf: np.ndarray) -> np.ndarray:
        return buf

    def sync(self) -> None:
        """Launches return when done: nothing is in flight."""

    def activate(self) -> None:
        """Any thread may launch host kernels."""

    def identity(self) -> str:
        """What tuned choices are keyed by."""
        return f"host {HOST.cpu} x{self.launcher.threads}"

    def launch_kernel(self, kernel, args, grid: tuple[int, int]) -> None:
        fn = self.linker.kernels.get(kernel.name)
        if fn is None:
            fn = self.linker.load(compile_kernel(kernel, HOST, self.cache).data, kernel.name, kernel.params())
        values = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args]
        self.launcher.launch(fn, values, grid)

    def close(self) -> None:
        self.launcher.close()


class CpuExecutor(HostDevice):
    """Runs a graph's fused plans on the host; the KV caches are state arrays it owns
    in storage dtype (`new_state`). It is its own device (`device`).

    A plan is bound to concrete dims once (scratch and input buffers allocated, every
    launch's arguments resolved to pointers) and reused while the dims and the state
    arrays stay the same, as a decode loop's do; a step is then a walk over prepared
    calls, like replaying a CUDA graph.
    """

    MAX_BOUND = 16

    @property
    def device(self) -> "CpuExecutor":
        return self

    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray], registry: Registry, options: PlanOptions,
                 cache: KernelCache | None = None, threads: int | None = None, poison: bool = False) -> None:
        self.graph = graph
        self.options = options
        super().__init__(cache, threads)
        self.plans = build_plans(graph, registry, options)
        # GEMMs are split over our own threads; BLAS's own would spin against the kernels'
        threadpool_limits(limits=1, user_api="blas")
        self.poison = poison
        self.weights = {n.name: np.ascontiguousarray(weights[n.name]) for n in graph.nodes("weight")}
        self._sources = [n for n in graph.nodes() if n.is_source]
        self._states = [n.name for n in self._sources if n.kind == "state"]
        self._gemm_weights: dict[str, np.ndarray] = {}
        self._bound: OrderedDict[tuple, _BoundPlan] = OrderedDict()
        for plan in self.plans.values():
            for kernel in plan.kernels():
                art = compile_kernel(kernel, HOST, self.cache)
                self.linker.load(art.data, kernel.name, kernel.params())

    def new_state(self, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
        return {n.name: np.zeros(n.type.bind(dims), dtype=n.type.dtype.storage) for n in self.graph.nodes("state")}

    def plan_for(self, num_tokens: int) -> Plan:
        return self.plans["gemv" if num_tokens <= self.options.crossover else "gemm"]

    def run(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graph outputs (storage dtype; logits are float32) for these inputs."""
        dims = source_dims(self._sources, inputs, state, self.weights)
        check_positions(inputs, self.options.max_positions)
        plan = self.plan_for(dims["T"])
        key = (plan.bucket, tuple(sorted(dims.items())), tuple(id(state[name]) for name in self._states))
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bind(plan, dims, state)
            self._bound[key] = bound
            if len(self._bound) > self.MAX_BOUND:
                self._bound.popitem(last=False)
        else:
            self._bound.move_to_end(key)
        for name, buf in bound.inputs.items():
            np.copyto(buf, inputs[name], casting="unsafe")
        if self.poison:
            for arr, poison in bound.scratch:
                arr.fill(poison)
        for call in bound.calls:
            call()
        return {name: bound.values[plan.resolve(name)].copy() for name in self.graph.outputs}

    def _bind(self, plan: Plan, dims: Mapping[str, int], state: Mapping[str, np.ndarray]) -> "_BoundPlan":
        values: dict[str, np.ndarray] = dict(self.weights)
        values.update({n.name: state[n.name] for n in self.graph.nodes("state")})
        inputs = {}
        for node in self.graph.nodes("input"):
            inputs[node.name] = values[node.name] = np.empty(node.type.bind(dims), node.type.dtype.storage)
        sizes: dict[int, int] = {}
        for value, slot in plan.slots.items():
            t = self.graph.node(value).type
            sizes[slot] = max(sizes.get(slot, 0), int(np.prod(t.bind(dims))) * t.dtype.itemsize)
        arenas = {slot: np.empty(size, np.uint8) for slot, size in sizes.items()}
        scratch = []
        for value, slot in plan.slots.items():
            t = self.graph.node(value).type
            shape = t.bind(dims)
            arr = arenas[slot][: int(np.prod(shape)) * t.dtype.itemsize].view(t.dtype.storage).reshape(shape)
            values[value] = arr
            scratch.append((arr, POISON[t.dtype]))
        calls = [self._prepare(plan, launch, dims, values) for launch in plan.launches]
        return _BoundPlan(values, inputs, calls, scratch)

    def _prepare(self, plan: Plan, launch: Launch, dims: Mapping[str, int], values: dict[str, np.ndarray]):
        """A no-argument callable that performs the launch on these buffers."""
        if launch.kind == "kernel":
            args: list[int] = []
            for a in launch.args:
                if a.kind == "dim":
                    args.append(int(dims[a.name]))
                elif a.kind == "const":
                    args.append(plan.constants[a.name].ctypes.data)
                else:
                    arr = values[plan.resolve(a.name)]
                    args.append(arr[1].ctypes.data if a.kind == "v_cache" else arr.ctypes.data)
            kernel = launch.kernel
            grid = kernel.grid({k: dims[v] for k, v in launch.grid_dims.items()})
            fn, launcher = self.linker.kernels[kernel.name], self.launcher
            return lambda: launcher.launch(fn, args, grid)
        if launch.kind == "gemm":
            return self._prepare_gemm(launch, values)
        (name,) = launch.outputs
        node = self.graph.node(name)
        srcs = [(values[plan.resolve(i)], self.graph.node(i).type.dtype) for i in node.inputs]
        dst = values[plan.resolve(name)]

        def reference() -> None:
            y = OPS[node.kind].reference(*(from_storage(v, d) for v, d in srcs), **node.attrs)
            np.copyto(dst, to_storage(round_to(y, node.type.dtype), node.type.dtype))
        return reference

    def _prepare_gemm(self, launch: Launch, values: dict[str, np.ndarray]):
        """y = x @ w.T with the output columns split over the launcher's threads; BLAS
        itself runs one thread each (see __init__), so no BLAS worker spins against
        the kernels' threads."""
        x_name, w_name = (a.name for a in launch.args)
        (out,) = launch.outputs
        x, y, w = values[x_name], values[out], self._gemm_weight(w_name)
        x_dtype, y_dtype = self.graph.node(x_name).type.dtype, self.graph.node(out).type.dtype
        xf = x if x_dtype is DType.F32 else np.empty(x.shape, np.float32)
        n = w.shape[0]
        bounds = [n * i // self.launcher.threads for i in range(self.launcher.threads + 1)]
        # (w_part @ x.T).T: BLAS then streams the big weight once and packs only the small
        # activation block; x @ w_part.T would pack (copy) the whole weight slice first
        parts = [(w[a:b], np.empty((b - a, x.shape[0]), np.float32), a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

        def part(wp: np.ndarray, yp: np.ndarray, a: int, b: int):
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

    def _gemm_weight(self, name: str) -> np.ndarray:
        """float32 copies of GEMM weights stored as f16/bf16, made once."""
        w = self._gemm_weights.get(name)
        if w is None:
            w = from_storage(self.weights[name], self.graph.node(name).type.dtype)
            w = np.ascontiguousarray(w, dtype=np.float32)
            self._gemm_weights[name] = w
        return w



@dataclass
class _BoundPlan:
    values: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    calls: list
    scratch: list[tuple[np.ndarray, object]]  # buffer, the value that poisons it
