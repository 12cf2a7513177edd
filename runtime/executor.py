"""Runs a graph's fused plans on a Device: plan choice, argument binding, the KV cache,
block copies and (where the device has them) captured decode graphs.

Memory: weights (placed by the device), the plans' constants, one activation arena
holding the graph inputs and every plan's buffer slots at the largest batch
(`runtime.memory`), then the KV cache, sized by the caller from what is left
(`allocate_kv`). A plan is bound to concrete dims once (views into the arena, every
launch's arguments resolved, GEMMs prepared) and reused while the dims stay the same,
as a decode loop's do: a step is a walk over prepared calls, or a graph replay.

`ReferenceExecutor` gives the interpreter of the unfused graph the same shape.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from fusec.fusion.dtypes import from_storage, round_to, to_storage
from fusec.fusion.interpreter import Interpreter
from fusec.fusion.ir import Graph, bind_dims
from fusec.fusion.ops import OPS
from fusec.fusion.patterns import Registry
from fusec.fusion.plan import Launch, Plan, PlanOptions, build_plan
from fusec.kernels.quant import checked_format
from fusec.runtime.device import Device, ExpertGemmShape, GemmShape
from fusec.runtime.memory import BATCH_DIMS, ArenaLayout, arena_layout

log = logging.getLogger(__name__)
# A layer's cache is [halves, NB, ...]: 2 (keys, values), or 1 for MLA's latent cache


def check_positions(inputs: Mapping[str, np.ndarray], max_positions: int) -> None:
    """RoPE kernels index a cos/sin table of max_positions rows."""
    pos = inputs.get("positions")
    if pos is not None and len(pos) and (int(np.min(pos)) < 0 or int(np.max(pos)) >= max_positions):
        raise ValueError(f"positions must be in [0, {max_positions})")


def kv_bytes_per_block(graph: Graph, itemsize: int | None = None) -> int:
    """Bytes of KV state (every layer) per cache block; itemsize overrides the graph's."""
    total = 0
    for node in graph.nodes("state"):
        per = int(np.prod(node.type.bind({"NB": 1})))
        total += per * (itemsize or node.type.dtype.itemsize)
    return total


@dataclass
class _Bound:
    """A plan bound to one batch shape: buffers and prepared calls."""

    plan: Plan
    dims: dict[str, int]
    inputs: dict[str, Any]  # graph input -> its arena view
    outputs: dict[str, Any]  # graph output -> its arena view
    scratch: list[Any]  # the plan's slot views (poisoned before a step when asked)
    calls: list[Callable[[], None]]
    graph: Any = None  # the calls captured, where every step runs as a graph (False: they cannot be)


@dataclass
class _Staged:
    bound: _Bound
    bucket: int | None  # the captured graph to replay, if any
    rows: int  # real sequences (a replayed batch is padded)


class PlanExecutor:
    MAX_BOUND = 32  # batch shapes kept bound (decode steps repeat few shapes)

    def __init__(self, device: Device, graph: Graph, weights: Mapping[str, np.ndarray], registry: Registry,
                 options: PlanOptions, max_dims: Mapping[str, int] | None = None, poison: bool = False,
                 extra_outputs: Sequence[str] = ()) -> None:
        self.device, self.graph, self.options, self.poison = device, graph, options, poison
        # extra_outputs are values only the gemm plan returns, for a step that asks (stage(extras=True)):
        # the gemv plan's fused kernels may keep them private (the LM-head GEMV norms and gathers its rows
        # in registers), while the gemm plan writes them to a buffer anyway, so keeping one costs no launch
        self.plans = {"gemv": build_plan(graph, registry, options, "gemv"),
                      "gemm": build_plan(graph.with_outputs(*graph.outputs, *extra_outputs), registry, options,
                                         "gemm")}
        kernels = {k.name: k for plan in self.plans.values() for k in plan.kernels()}
        for kernel in tqdm(kernels.values(), desc="loading kernels", unit="kernel", disable=None, leave=False):
            device.load(kernel)
        self.weights = device.place_weights(list(graph.nodes("weight")), weights)
        self.constants = {}
        for plan in self.plans.values():
            for name, value in plan.constants.items():
                arr = self.constants[name] = device.buffer(value.shape, value.dtype)
                device.upload(arr, value)
        has_gemm = any(launch.kind in ("gemm", "moe_gemm") for plan in self.plans.values() for launch in plan.launches)
        self.gemm = device.gemm_library() if has_gemm else None
        self._inputs = list(graph.nodes("input"))
        self._weight_dims: dict[str, int] = {}
        for node in graph.nodes("weight"):
            shape = tuple(self.weights[node.name].shape)
            if node.format:
                checked_format(node, shape)
            else:  # plain weights may have symbolic dims
                bind_dims(node, shape, self._weight_dims)
        self._fixed_dims = dict(self._weight_dims)  # and the KV cache's, once it has one
        self.kv: dict[str, Any] = {}
        self.num_blocks = 0
        self.graphs: dict[int, Any] = {}  # decode batch bucket -> captured step
        self.graph_steps = False  # every all-kernel step as a graph (capture_graphs on a device where that is cheap)
        self._bound: OrderedDict[tuple, _Bound] = OrderedDict()
        self.max_dims: dict[str, int] = {}
        self.layout: ArenaLayout | None = None
        self.arena: Any = None
        self._reserve(max_dims or {})
        device.sync()

    # -- memory ---------------------------------------------------------------------------
    def _reserve(self, dims: Mapping[str, int]) -> None:
        """Make the arena hold a batch of these dims (and every dim seen so far)."""
        dims = {k: v for k, v in dims.items() if k in BATCH_DIMS}
        if self.arena is not None and all(v <= self.max_dims.get(k, 0) for k, v in dims.items()):
            return
        grown = dict(self.max_dims)
        grown.update({k: max(v, grown.get(k, 0)) for k, v in dims.items()})
        try:
            layout = arena_layout(self.graph, self.plans, grown)
        except KeyError:  # dims the graph needs are still unknown: sized on the first run
            return
        if self.graphs:
            log.warning("a batch of %s outgrew the arena: decode graphs are recaptured", dims)
        self.max_dims, self.layout = grown, layout
        self._bound.clear()  # their views point into the old arena
        self.arena = None  # free the old one first
        self.arena = self.device.buffer((layout.size,), np.uint8)
        log.info("activation arena: %.1f MiB for %s", layout.size / 2 ** 20, grown)
        if self.graphs:
            self.capture_graphs(sorted(self.graphs))

    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.graph)

    def allocate_kv(self, num_blocks: int) -> None:
        """The KV cache: every layer's keys and values for num_blocks blocks, zeroed."""
        kv = {}
        for n in self.graph.nodes("state"):
            kv[n.name] = self.device.zeros(n.type.bind({"NB": num_blocks}), n.type.dtype.storage)
        self._use_kv(kv)

    def load_kv(self, host_state: Mapping[str, np.ndarray]) -> None:
        """A KV cache holding these host arrays (storage dtype): for tests and checks."""
        kv = {}
        for n in self.graph.nodes("state"):
            arr = kv[n.name] = self.device.buffer(host_state[n.name].shape, n.type.dtype.storage)
            self.device.upload(arr, host_state[n.name])
        self._use_kv(kv)

    def _use_kv(self, kv: dict[str, Any]) -> None:
        self.kv = kv
        self._bound.clear()  # bound plans and graphs point at the old cache
        self.graphs.clear()
        self._fixed_dims = dict(self._weight_dims)
        for n in self.graph.nodes("state"):
            bind_dims(n, tuple(kv[n.name].shape), self._fixed_dims)
        self.num_blocks = self._fixed_dims.get("NB", 0)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy KV blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        for arr in self.kv.values():
            half = arr.nbytes // arr.shape[0]
            per_block = half // arr.shape[1]
            block_shape = arr.shape[2:]
            for src, dst in pairs:
                for base in range(0, arr.nbytes, half):
                    self.device.copy(self.device.view(arr, block_shape, arr.dtype, base + dst * per_block),
                                     self.device.view(arr, block_shape, arr.dtype, base + src * per_block))

    def close(self) -> None:
        self.device.sync()
        if self.gemm is not None:
            self.gemm.close()
            self.gemm = None

    # -- steps ----------------------------------------------------------------------------
    def plan_for(self, num_tokens: int, extras: bool = False) -> Plan:
        return self.plans["gemv" if num_tokens <= self.options.crossover and not extras else "gemm"]

    def _dims(self, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
        dims = dict(self._fixed_dims)
        for node in self._inputs:
            bind_dims(node, tuple(np.shape(inputs[node.name])), dims)
        return dims

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """One step; the outputs are device buffers valid until the next run."""
        return self.launch(self.stage(inputs))

    def stage(self, inputs: Mapping[str, np.ndarray], extras: bool = False) -> "_Staged":
        """A step's host work before any launch: dims, the bound plan (prepared once per
        shape), the inputs copied in. A decode step goes to the captured graph of the
        smallest bucket that holds it. With `extras` the step also returns the extra
        outputs: it runs the gemm plan, eagerly."""
        bucket = None if extras else self._graph_bucket(inputs)
        rows = 0
        if bucket is not None:
            tables, rows = inputs["block_tables"], len(inputs["context_lens"])
            inputs = pad_decode_inputs(inputs, bucket, self.max_dims["B"], tables=False)
        dims = self._dims(inputs)
        check_positions(inputs, self.options.max_positions)
        self._reserve(dims)
        bound = self._bind(self.plan_for(dims["T"], extras), dims)
        for name, buf in bound.inputs.items():
            if bucket is not None and name == "block_tables":
                # only the real rows' used columns: the rest holds block ids written before
                # (zeros at capture), valid for padding rows and never read for real ones
                self.device.upload_rows(buf, tables)
            else:
                self.device.upload(buf, inputs[name])
        return _Staged(bound, bucket, rows)

    def launch(self, staged: "_Staged") -> dict[str, Any]:
        """Run (or enqueue) a staged step: a graph replay or the walk over prepared calls."""
        dev, bound = self.device, staged.bound
        with dev.step_scope():
            if staged.bucket is not None:
                dev.replay(self.graphs[staged.bucket])
                return {name: dev.view(out, (staged.rows, *out.shape[1:]), out.dtype)
                        for name, out in bound.outputs.items()}
            if self.poison:
                for buf in bound.scratch:
                    dev.fill_bytes(buf, 0xFF)  # NaN in f32, f16 and bf16
            graph = self._step_graph(bound)
            if graph:
                dev.replay(graph)
            else:
                for call in bound.calls:
                    call()
        return dict(bound.outputs)

    def _step_graph(self, bound: _Bound) -> Any:
        """The bound shape's calls as a graph, captured on its first step, where the
        device makes that cheap (the host: a prefill's ~200 pool launches cost ~10 ms
        more than one replay of them) and the plan holds only capturable launches."""
        if not self.graph_steps:
            return None
        if bound.graph is None:
            bound.graph = self._capture(bound) if self._capturable(bound.plan) else False
        return bound.graph

    def _capturable(self, plan: Plan) -> bool:
        return all(launch.kind in self.device.graph_launch_kinds for launch in plan.launches)

    def _capture(self, bound: _Bound) -> Any:
        return self.device.capture(lambda: [call() for call in bound.calls])

    def capture_graphs(self, buckets: Sequence[int]) -> list[int]:
        """Capture the decode step of each bucket size (batches padded up to it). Returns
        the buckets captured: those the arena holds."""
        self.graphs.clear()
        captured = {}
        for bucket in buckets:
            if bucket > self.max_dims.get("S", 0):
                continue
            if not self._capturable(self.plan_for(bucket)):
                continue  # e.g. the host's library GEMMs: those batches run their calls
            inputs = pad_decode_inputs(_empty_decode(), bucket, self.max_dims["B"])
            dims = self._dims(inputs)
            bound = self._bind(self.plan_for(bucket), dims)
            for name, buf in bound.inputs.items():
                self.device.upload(buf, inputs[name])
            with self.device.step_scope():
                for call in bound.calls:  # eager first: library plans and lazy init outside capture
                    call()
            self.device.sync()
            captured[bucket] = self._capture(bound)
        self.graphs = captured
        self.graph_steps = self.device.graphs_any_step
        self.device.sync()
        log.info("captured decode graphs for batch sizes %s (%d KV blocks)", sorted(captured), self.num_blocks)
        return sorted(captured)

    def _graph_bucket(self, inputs: Mapping[str, np.ndarray]) -> int | None:
        if not self.graphs:
            return None
        rows = len(inputs["context_lens"])
        if len(inputs["token_ids"]) != rows or len(inputs["logits_indices"]) != rows:
            return None  # not a pure decode step (a prefill chunk, or all logits)
        if inputs["block_tables"].shape[1] > self.max_dims["B"]:
            return None
        return min((b for b in self.graphs if b >= rows), default=None)

    # -- binding --------------------------------------------------------------------------
    def _bind(self, plan: Plan, dims: dict[str, int]) -> _Bound:
        key = (plan.bucket, tuple(dims[d] for d in BATCH_DIMS if d in dims))
        bound = self._bound.get(key)
        if bound is not None:
            self._bound.move_to_end(key)
            return bound
        dev, layout, graph = self.device, self.layout, self.graph
        values: dict[str, Any] = dict(self.weights)
        values.update(self.kv)
        inputs = {}
        for node in self._inputs:
            inputs[node.name] = values[node.name] = dev.view(self.arena, node.type.bind(dims), node.type.dtype.storage,
                                                             layout.inputs[node.name])
        scratch = []
        for value, slot in plan.slots.items():
            t = graph.node(value).type
            values[value] = dev.view(self.arena, t.bind(dims), t.dtype.storage, layout.slots[(plan.bucket, slot)])
            scratch.append(values[value])
        calls = [self._prepare(plan, launch, dims, values) for launch in plan.launches]
        outputs = {name: values[plan.resolve(name)] for name in plan.graph.outputs}
        bound = self._bound[key] = _Bound(plan, dims, inputs, outputs, scratch, calls)
        if len(self._bound) > self.MAX_BOUND:
            self._bound.popitem(last=False)
        return bound

    def _prepare(self, plan: Plan, launch: Launch, dims: Mapping[str, int], values: Mapping[str, Any]
                 ) -> Callable[[], None]:
        """A no-argument callable that performs the launch on these buffers."""
        if launch.kind == "kernel":
            args: list[Any] = []
            for a in launch.args:
                if a.kind == "dim":
                    args.append(np.int32(dims[a.name]))
                elif a.kind == "const":
                    args.append(self.constants[a.name])
                else:
                    arr = values[plan.resolve(a.name)]
                    if a.kind == "v_cache":
                        arr = self.device.view(arr, arr.shape[1:], arr.dtype, arr.nbytes // arr.shape[0])
                    args.append(arr)
            kernel = launch.kernel
            grid = kernel.grid({k: dims[v] for k, v in launch.grid_dims.items()})
            if grid[0] * grid[1] == 0:
                return lambda: None
            return self.device.prepare_launch(kernel, args, grid)
        if launch.kind == "moe_gemm":
            (out,) = launch.outputs
            node = self.graph.node(out)
            x_name, route_name, w_name = node.inputs
            w_node = self.graph.node(w_name)
            experts = node.attrs["experts"]
            one = GemmShape(0, w_node.type.shape[0] // experts, w_node.type.shape[1],
                            self.graph.node(x_name).type.dtype, node.type.dtype, w_node.format, w_node.type.dtype)
            shape = ExpertGemmShape(one, experts, node.attrs["slots"], node.attrs.get("combine", False))
            return self.gemm.prepare_experts(shape, values[plan.resolve(x_name)], values[plan.resolve(route_name)],
                                             values[w_name], values[plan.resolve(out)])
        if launch.kind == "gemm":
            x_name, w_name = (a.name for a in launch.args)
            (out,) = launch.outputs
            x, w, y = values[plan.resolve(x_name)], values[w_name], values[plan.resolve(out)]
            x_dtype, w_dtype, y_dtype = (self.graph.node(n).type.dtype for n in (x_name, w_name, out))
            if not x.shape[0]:
                return lambda: None
            w_node = self.graph.node(w_name)
            n, k = w_node.type.shape
            return self.gemm.prepare(GemmShape(x.shape[0], n, k, x_dtype, y_dtype, w_node.format, w_dtype), x, w, y)
        if not isinstance(self.arena, np.ndarray):
            raise NotImplementedError(f"{launch.name}: {launch.kind} launches run on the host only")
        (name,) = launch.outputs
        node = self.graph.node(name)
        srcs = [(values[plan.resolve(i)], self.graph.node(i).type.dtype) for i in node.inputs]
        dst = values[plan.resolve(name)]

        def reference() -> None:
            y = OPS[node.kind].reference(*(from_storage(v, d) for v, d in srcs), **node.attrs)
            np.copyto(dst, to_storage(round_to(y, node.type.dtype), node.type.dtype))
        return reference


class ReferenceExecutor:
    """The interpreter of the unfused graph behind the executor's interface: float32 KV
    cache on the host, no device."""

    device = None

    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray], extra_outputs: Sequence[str] = ()) -> None:
        self.graph = graph
        # the interpreter computes every value anyway: the extra outputs are always returned
        self.interpreter = Interpreter(graph.with_outputs(*graph.outputs, *extra_outputs), weights)
        self.kv: dict[str, np.ndarray] = {}
        self.num_blocks = 0

    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.graph, itemsize=4)

    def allocate_kv(self, num_blocks: int) -> None:
        self.kv = self.interpreter.new_state({"NB": num_blocks})
        self.num_blocks = num_blocks

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        src, dst = [s for s, _ in pairs], [d for _, d in pairs]
        for cache in self.kv.values():
            cache[:, dst] = cache[:, src]

    def stage(self, inputs: Mapping[str, np.ndarray], extras: bool = False) -> Mapping[str, np.ndarray]:
        return inputs

    def launch(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.interpreter.run(inputs, self.kv)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.launch(inputs)

    def close(self) -> None:
        pass


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
