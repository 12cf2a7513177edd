"""Executes fused Plans on an NVIDIA GPU through cuda.core (work in progress).

What exists: PTX kernels from the fusec cache loaded with `ObjectCode.from_ptx`,
weights, KV caches and scratch buffers in device memory, launches on one stream.
Library GEMMs (cuBLASLt through nvmath-python), GPU sampling, CUDA graphs and
memory sizing from --gpu-memory-utilization come with the CUDA backend issue; until
then a plan that needs a GEMM raises, so run with a crossover that keeps every batch
in the fused-GEMV plan. Imported only on the GPU path.
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import Target
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.ir import Graph, bind_dims
from fusec.fusion.patterns import Registry
from fusec.fusion.plan import Launch, Plan, PlanOptions, build_plans
from fusec.kernels.base import GPU_LANES
from fusec.runtime.backends.cpu import check_positions

log = logging.getLogger(__name__)


def _check(result) -> None:
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")


class DeviceArray:
    """A device buffer with a shape and a storage dtype."""

    def __init__(self, device, stream, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.buffer = device.allocate(max(self.nbytes, 1), stream=stream)
        stream.sync()  # stream-ordered allocation; the copies below are synchronous
        self.ptr = int(self.buffer.handle)

    def upload(self, host: np.ndarray) -> None:
        from cuda.bindings import driver

        host = np.ascontiguousarray(host, dtype=self.dtype)
        assert host.nbytes == self.nbytes, (host.shape, self.shape)
        if self.nbytes:
            _check(driver.cuMemcpyHtoD(self.ptr, host.ctypes.data, self.nbytes))

    def download(self) -> np.ndarray:
        from cuda.bindings import driver

        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            _check(driver.cuMemcpyDtoH(out.ctypes.data, self.ptr, self.nbytes))
        return out

    def fill_bytes(self, byte: int) -> None:
        from cuda.bindings import driver

        if self.nbytes:
            _check(driver.cuMemsetD8(self.ptr, byte, self.nbytes))


def device_target(device) -> Target:
    major, _minor = device.compute_capability
    return Target("sm_90" if major >= 9 else "sm_80")


class CudaExecutor:
    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray], registry: Registry, options: PlanOptions,
                 cache: KernelCache | None = None, poison: bool = False) -> None:
        from cuda.core import Device, ObjectCode

        self.device = Device()
        self.device.set_current()
        self.stream = self.device.create_stream()
        self.graph, self.options, self.poison = graph, options, poison
        self.plans = build_plans(graph, registry, options)
        cache = cache or KernelCache()
        self.kernels = {}
        for plan in self.plans.values():
            for kernel in plan.kernels():
                if kernel.name not in self.kernels:
                    ptx = compile_kernel(kernel, options.target, cache).data
                    self.kernels[kernel.name] = ObjectCode.from_ptx(ptx).get_kernel(kernel.name)
        self.weights = {}
        for node in graph.nodes("weight"):
            arr = DeviceArray(self.device, self.stream, node.type.shape, node.type.dtype.storage)
            arr.upload(weights[node.name])
            self.weights[node.name] = arr
        self.constants = {}
        for plan in self.plans.values():
            for name, value in plan.constants.items():
                arr = DeviceArray(self.device, self.stream, value.shape, value.dtype)
                arr.upload(value)
                self.constants[name] = arr

    def new_state(self, dims: Mapping[str, int]) -> dict[str, DeviceArray]:
        state = {}
        for n in self.graph.nodes("state"):
            arr = DeviceArray(self.device, self.stream, n.type.bind(dims), n.type.dtype.storage)
            arr.fill_bytes(0)
            state[n.name] = arr
        return state

    def copy_blocks(self, state: Mapping[str, DeviceArray], pairs) -> None:
        """Copy KV blocks src -> dst in every layer's cache (copy-on-write)."""
        from cuda.bindings import driver

        for arr in state.values():
            half = arr.nbytes // 2
            block = half // arr.shape[1]
            for src, dst in pairs:
                for base in (0, half):
                    _check(driver.cuMemcpyDtoD(arr.ptr + base + dst * block, arr.ptr + base + src * block, block))

    def close(self) -> None:
        self.device.sync()

    def plan_for(self, num_tokens: int) -> Plan:
        return self.plans["gemv" if num_tokens <= self.options.crossover else "gemm"]

    def run(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, DeviceArray]) -> dict[str, np.ndarray]:
        dims: dict[str, int] = {}
        values: dict[str, DeviceArray] = {}
        for node in self.graph.nodes():
            if node.kind == "input":
                host = np.ascontiguousarray(inputs[node.name], dtype=node.type.dtype.storage)
                arr = DeviceArray(self.device, self.stream, host.shape, host.dtype)
                arr.upload(host)
            elif node.kind == "state":
                arr = state[node.name]
            elif node.kind == "weight":
                arr = self.weights[node.name]
            else:
                continue
            bind_dims(node, arr.shape, dims)
            values[node.name] = arr
        check_positions(inputs, self.options.max_positions)
        plan = self.plan_for(dims["T"])
        for value in plan.slots:  # one buffer per value: slot reuse comes with the real arena
            t = self.graph.node(value).type
            arr = DeviceArray(self.device, self.stream, t.bind(dims), t.dtype.storage)
            if self.poison:
                arr.fill_bytes(0xFF)  # NaN in f32, f16 and bf16
            values[value] = arr
        for launch in plan.launches:
            self._launch(plan, launch, dims, values)
        self.device.sync()
        return {name: values[plan.resolve(name)].download() for name in self.graph.outputs}

    def _launch(self, plan: Plan, launch: Launch, dims: Mapping[str, int], values: dict[str, DeviceArray]) -> None:
        from cuda.core import LaunchConfig, launch as cu_launch

        if launch.kind != "kernel":
            raise NotImplementedError(f"{launch.name}: {launch.kind} launches need the CUDA backend's GEMM path")
        args = []
        for a in launch.args:
            if a.kind == "dim":
                args.append(np.int32(dims[a.name]))
            elif a.kind == "const":
                args.append(np.uint64(self.constants[a.name].ptr))
            else:
                arr = values[plan.resolve(a.name)]
                offset = arr.nbytes // 2 if a.kind == "v_cache" else 0
                args.append(np.uint64(arr.ptr + offset))
        kernel = launch.kernel
        grid = kernel.grid({k: dims[v] for k, v in launch.grid_dims.items()})
        if grid[0] * grid[1] == 0:
            return
        config = LaunchConfig(grid=grid, block=GPU_LANES)
        cu_launch(self.stream, config, self.kernels[kernel.name], *args)
