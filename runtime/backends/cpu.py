"""Executes fused Plans on the CPU: host-JIT kernels over threads, numpy GEMMs."""
from __future__ import annotations

import logging
import os
from typing import Mapping

import numpy as np

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.host import HostLauncher, HostLinker
from fusec.fusion.codegen.target import HOST
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType, from_storage, round_to, to_storage
from fusec.fusion.ir import Graph, Node
from fusec.fusion.ops import OPS
from fusec.fusion.patterns import Registry
from fusec.fusion.plan import Launch, Plan, PlanOptions, build_plans

log = logging.getLogger(__name__)
POISON = {DType.F32: np.float32(np.nan), DType.F16: np.float16(np.nan), DType.BF16: np.uint16(0x7FC0),
          DType.I32: np.int32(-(2 ** 31))}


def bind_dims(node: Node, arr: np.ndarray, dims: dict[str, int]) -> None:
    """Bind node's symbolic dims from arr's shape; a shape that disagrees is an error,
    never an out-of-bounds read in a kernel."""
    if arr.ndim != len(node.type.shape):
        raise ValueError(f"{node.name}: rank {arr.ndim}, expected {node.type}")
    for want, got in zip(node.type.shape, arr.shape):
        if isinstance(want, str):
            if dims.setdefault(want, got) != got:
                raise ValueError(f"{node.name}: dim {want}={got}, bound to {dims[want]} earlier")
        elif want != got:
            raise ValueError(f"{node.name}: shape {arr.shape}, expected {node.type}")


def check_positions(inputs: Mapping[str, np.ndarray], max_positions: int) -> None:
    """RoPE kernels index a cos/sin table of max_positions rows."""
    pos = inputs.get("positions")
    if pos is not None and len(pos) and (int(np.min(pos)) < 0 or int(np.max(pos)) >= max_positions):
        raise ValueError(f"positions must be in [0, {max_positions})")


class CpuExecutor:
    """Runs a graph's fused plans on the host; the KV caches are state arrays it owns
    in storage dtype (`new_state`)."""

    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray], registry: Registry, options: PlanOptions,
                 cache: KernelCache | None = None, threads: int | None = None, poison: bool = False) -> None:
        self.graph = graph
        self.options = options
        self.plans = build_plans(graph, registry, options)
        self.cache = cache or KernelCache()
        self.linker = HostLinker()
        self.launcher = HostLauncher(threads or os.cpu_count() or 1)
        self.poison = poison
        self.weights = {n.name: np.ascontiguousarray(weights[n.name]) for n in graph.nodes("weight")}
        self._gemm_weights: dict[str, np.ndarray] = {}
        for plan in self.plans.values():
            for kernel in plan.kernels():
                art = compile_kernel(kernel, HOST, self.cache)
                self.linker.load(art.data, kernel.name, kernel.params())

    def new_state(self, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
        return {n.name: np.zeros(n.type.bind(dims), dtype=n.type.dtype.storage) for n in self.graph.nodes("state")}

    def plan_for(self, num_tokens: int) -> Plan:
        return self.plans["gemv" if num_tokens <= self.options.crossover else "gemm"]

    def run(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        dims: dict[str, int] = {}
        values: dict[str, np.ndarray] = {}
        for node in self.graph.nodes():
            if node.kind == "input":
                arr = np.ascontiguousarray(inputs[node.name], dtype=node.type.dtype.storage)
            elif node.kind == "state":
                arr = state[node.name]
            elif node.kind == "weight":
                arr = self.weights[node.name]
            else:
                continue
            bind_dims(node, arr, dims)
            values[node.name] = arr
        check_positions(inputs, self.options.max_positions)
        plan = self.plan_for(dims["T"])
        self._allocate(plan, dims, values)
        for launch in plan.launches:
            self._execute(plan, launch, dims, values)
        return {name: values[plan.resolve(name)] for name in self.graph.outputs}

    def _allocate(self, plan: Plan, dims: Mapping[str, int], values: dict[str, np.ndarray]) -> None:
        sizes: dict[int, int] = {}
        for value, slot in plan.slots.items():
            t = self.graph.node(value).type
            sizes[slot] = max(sizes.get(slot, 0), int(np.prod(t.bind(dims))) * t.dtype.itemsize)
        arenas = {slot: np.empty(size, np.uint8) for slot, size in sizes.items()}
        for value, slot in plan.slots.items():
            t = self.graph.node(value).type
            shape = t.bind(dims)
            arr = arenas[slot][: int(np.prod(shape)) * t.dtype.itemsize].view(t.dtype.storage).reshape(shape)
            if self.poison:
                arr.fill(POISON[t.dtype])
            values[value] = arr

    def _execute(self, plan: Plan, launch: Launch, dims: Mapping[str, int], values: dict[str, np.ndarray]) -> None:
        if launch.kind == "kernel":
            args: list[int | float] = []
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
            self.launcher.launch(self.linker.kernels[kernel.name], args, grid)
        elif launch.kind == "gemm":
            x_name, w_name = (a.name for a in launch.args)
            (out,) = launch.outputs
            t_x, t_out = self.graph.node(x_name).type, self.graph.node(out).type
            x = from_storage(values[x_name], t_x.dtype)
            y = x @ self._gemm_weight(w_name).T
            values[out][...] = to_storage(round_to(y, t_out.dtype), t_out.dtype)
        else:
            (name,) = launch.outputs
            node = self.graph.node(name)
            ins = [from_storage(values[plan.resolve(i)], self.graph.node(i).type.dtype) for i in node.inputs]
            y = OPS[node.kind].reference(*ins, **node.attrs)
            values[plan.resolve(name)][...] = to_storage(round_to(y, node.type.dtype), node.type.dtype)

    def _gemm_weight(self, name: str) -> np.ndarray:
        """float32 copies of GEMM weights stored as f16/bf16, made once."""
        w = self._gemm_weights.get(name)
        if w is None:
            w = from_storage(self.weights[name], self.graph.node(name).type.dtype)
            w = np.ascontiguousarray(w, dtype=np.float32)
            self._gemm_weights[name] = w
        return w

    def close(self) -> None:
        self.launcher.close()
