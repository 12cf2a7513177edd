"""From a graph to Plans: fusion by the pattern registry, ordering, buffer planning.

A `Plan` is an ordered list of `Launch`es for one bucket: "gemv" (T <= crossover:
fused GEMV kernels) or "gemm" (library GEMMs with fused row kernels between them).
Values keep their graph node names. A launch's arguments name values, runtime dims
or plan constants (e.g. RoPE cos/sin tables).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import networkx as nx
import numpy as np

from fusec.fusion.codegen.target import Target
from fusec.fusion.ir import Graph, Node
from fusec.fusion.ops import IN_PLACE
from fusec.fusion.patterns import BUCKETS, Match, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arg:
    """A launch argument: a value ("value"), the key or value half of a KV cache
    ("k_cache" / "v_cache"), a plan constant ("const") or a runtime dim ("dim")."""

    kind: str
    name: str


@dataclass
class Launch:
    name: str
    pattern: str
    nodes: tuple[str, ...]
    kind: str  # "kernel" | "gemm" | "reference"
    args: tuple[Arg, ...]
    outputs: tuple[str, ...]
    grid_dims: Mapping[str, str] = field(default_factory=dict)  # kernel dim -> graph dim
    kernel: Any = None  # a fusec.kernels.base.Kernel for kind "kernel"
    layer: int | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """Values the launch reads (kernels take their outputs as arguments too)."""
        return tuple(a.name for a in self.args
                     if a.kind in ("value", "k_cache", "v_cache") and a.name not in self.outputs)


@dataclass
class LowerContext:
    """What a pattern's `lower` needs besides the match."""

    graph: Graph
    target: Target
    bucket: str
    max_positions: int
    gpu_shapes: bool = False  # GPU-shaped kernels: 16-byte loads, grouped attention heads
    int8_activations: bool = False  # host GEMVs over q8_0 / q4_0 / q4_1 weights may quantize their input
    constants: dict[str, np.ndarray] = field(default_factory=dict)

    def kernel_launch(self, match: Match, kernel: Any, args: Mapping[str, Arg], outputs: tuple[str, ...],
                      grid_dims: Mapping[str, str]) -> Launch:
        missing = [p.name for p in kernel.params() if p.name not in args]
        if missing:
            raise ValueError(f"{match.pattern.name}: no argument for kernel params {missing}")
        ordered = tuple(args[p.name] for p in kernel.params())
        return Launch(name="", pattern=match.pattern.name, nodes=(), kind="kernel", args=ordered,
                      outputs=outputs, grid_dims=dict(grid_dims), kernel=kernel)


@dataclass
class Plan:
    bucket: str
    target: Target
    launches: list[Launch]
    slots: dict[str, int]  # intermediate value -> buffer slot (liveness-based reuse)
    aliases: dict[str, str]  # value -> the state buffer it is (in-place ops)
    constants: dict[str, np.ndarray]
    graph: Graph

    @property
    def num_slots(self) -> int:
        return len(set(self.slots.values()))

    def kernels(self) -> list[Any]:
        """Distinct kernels, in first-use order."""
        seen: dict[str, Any] = {}
        for launch in self.launches:
            if launch.kernel is not None:
                seen.setdefault(launch.kernel.name, launch.kernel)
        return list(seen.values())

    def resolve(self, value: str) -> str:
        while value in self.aliases:
            value = self.aliases[value]
        return value


@dataclass(frozen=True)
class PlanOptions:
    target: Target
    max_positions: int
    crossover: int = 8  # the largest T served by the "gemv" plan
    # GPU-shaped kernels (16-byte vector loads where shapes allow, one attention block per
    # KV head's query group): None = on GPUs. On the host both measured slower (decode
    # 20% with vector loads, batches of 8 about 8% with grouped heads): scalar loops
    # suit LLVM's host vectoriser better.
    gpu_shapes: bool | None = None
    # Host GEMVs over q8_0 / q4_0 / q4_1 weights quantize a decode token's input row to int8
    # and dot it with the weights' bytes (kernels/gemv.py `int8_dots`): None = where the CPU
    # has AVX-512 VNNI. False keeps every activation in float (the reference's arithmetic).
    int8_activations: bool | None = None


def has_int8_dots(target: Target) -> bool:
    """Whether int8 activations can run here: a CPU with AVX-512 VNNI (vpdpbusd on 256-bit vectors)."""
    return target.has_feature("avx512vnni") and target.has_feature("avx512vl")


def int8_dots_on(target: Target, int8_activations: bool | None) -> bool:
    """Whether plans for target quantize GEMV inputs (PlanOptions.int8_activations; None: where the CPU can)."""
    return has_int8_dots(target) if int8_activations is None else int8_activations


def dead_code_elimination(graph: Graph) -> set[str]:
    """Names of op nodes that neither a graph output nor a state update depends on."""
    roots = set(graph.outputs) | {n.name for n in graph.ops() if n.kind in IN_PLACE}
    live: set[str] = set(roots)
    for out in roots:
        live |= nx.ancestors(graph.nx, out)
    return {n.name for n in graph.ops() if n.name not in live}


def fuse(graph: Graph, registry: Registry, ctx: LowerContext) -> list[tuple[Match, Launch]]:
    """Greedy matching in priority order; every live op ends up in exactly one group."""
    dead = dead_code_elimination(graph)
    if dead:
        log.info("dropping %d dead ops", len(dead))
    order = {n.name: i for i, n in enumerate(graph.nodes())}
    op_names = [n.name for n in graph.ops() if n.name not in dead]
    claimed: set[str] = set()
    groups: list[tuple[Match, Launch]] = []
    op_links = graph.nx.subgraph(op_names).to_undirected()
    for pattern in registry.for_bucket(ctx.bucket):
        # match only among unclaimed ops of the pattern's kinds: same matches, far less search
        kinds = set(pattern.kinds)
        candidates = {n for n in op_names if n not in claimed and graph.node(n).kind in kinds}
        found = sorted(pattern.matches(graph, candidates, op_links), key=lambda m: max(order[n] for n in m.names))
        for match in found:
            if match.names & claimed or (pattern.constraint and not pattern.constraint(match)):
                continue
            launch = pattern.lower(match, ctx)
            claimed |= match.names
            groups.append((match, launch))
    for name in op_names:
        if name not in claimed:
            groups.append((None, _reference_launch(graph.node(name), ctx)))  # type: ignore[arg-type]
    return groups


def _reference_launch(node: Node, ctx: LowerContext) -> Launch:
    """An op no pattern covers runs its numpy reference, on the host only. In-place ops
    (the KV cache write) cannot: the host backend's state is in storage dtype."""
    if ctx.target.is_gpu or node.kind in IN_PLACE:
        raise ValueError(f"no kernel pattern covers op {node.name} ({node.kind}) for {ctx.target.arch}")
    return Launch(name=node.name, pattern=f"reference:{node.kind}", nodes=(node.name,), kind="reference",
                  args=tuple(Arg("value", i) for i in node.inputs), outputs=(node.name,), layer=node.layer)


def build_plan(graph: Graph, registry: Registry, options: PlanOptions, bucket: str) -> Plan:
    if bucket not in BUCKETS:
        raise ValueError(f"unknown bucket {bucket!r}")
    gpu_shapes = options.target.is_gpu if options.gpu_shapes is None else options.gpu_shapes
    int8 = int8_dots_on(options.target, options.int8_activations)
    if int8 and not has_int8_dots(options.target):
        raise ValueError(f"int8 activations need a CPU with AVX-512 VNNI, not {options.target.arch}")
    ctx = LowerContext(graph, options.target, bucket, options.max_positions, gpu_shapes, int8)
    groups = fuse(graph, registry, ctx)
    owner: dict[str, int] = {}
    position = {n: i for i, n in enumerate(graph.nx.nodes)}
    for gi, (match, launch) in enumerate(groups):
        nodes = tuple(sorted(match.names, key=position.__getitem__)) if match is not None else launch.nodes
        launch.nodes = nodes
        if not launch.name:
            launch.name = nodes[-1]
        # a launch belongs to the layer of its last op (a residual add fused into the next
        # layer's first kernel counts there)
        launch.layer = graph.node(nodes[-1]).layer
        for n in nodes:
            owner[n] = gi
    # order groups topologically by the dependencies between their nodes
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(groups)))
    for u, v in graph.nx.edges:
        if u in owner and v in owner and owner[u] != owner[v]:
            deps.add_edge(owner[u], owner[v])
    first = {gi: min(position[n] for n in groups[gi][1].nodes) for gi in range(len(groups))}
    order = list(nx.lexicographical_topological_sort(deps, key=first.__getitem__))
    launches = [groups[gi][1] for gi in order]
    aliases = {n.name: n.inputs[IN_PLACE[n.kind]] for n in graph.ops() if n.kind in IN_PLACE}
    plan = Plan(bucket, options.target, launches, {}, aliases, ctx.constants, graph)
    plan.slots = plan_buffers(plan)
    return plan


def plan_buffers(plan: Plan) -> dict[str, int]:
    """Assign each intermediate value a slot; a slot is reused once its value is dead."""
    graph = plan.graph
    sources = {n.name for n in graph.nodes() if n.is_source}
    last_use: dict[str, int] = {}
    for i, launch in enumerate(plan.launches):
        for v in launch.inputs:
            last_use[plan.resolve(v)] = i
    for out in graph.outputs:
        last_use[plan.resolve(out)] = len(plan.launches)
    slots: dict[str, int] = {}
    free: list[int] = []
    live: dict[str, int] = {}
    next_slot = 0
    for i, launch in enumerate(plan.launches):
        for v in [v for v in live if last_use.get(v, -1) < i]:
            free.append(live.pop(v))
        for out in launch.outputs:
            value = plan.resolve(out)
            if value in sources or value in slots:
                continue
            if free:
                slot = free.pop(0)
            else:
                slot, next_slot = next_slot, next_slot + 1
            slots[value] = slot
            live[value] = slot
    return slots


def build_plans(graph: Graph, registry: Registry, options: PlanOptions) -> dict[str, Plan]:
    return {bucket: build_plan(graph, registry, options, bucket) for bucket in BUCKETS}
