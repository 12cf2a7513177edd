"""Human-readable reports of what the compiler did to a graph (`fusec compile`)."""
from __future__ import annotations

from collections import defaultdict

from fusec.fusion.plan import Plan


def _layer_key(layer: int | None) -> tuple[int, int]:
    return (1, 0) if layer is None else (0, layer)


def layer_summary(plan: Plan) -> list[tuple[int | None, int, list[str]]]:
    """(layer, unfused op count, patterns of its launches in order) per layer; None = outside layers."""
    ops: dict[int | None, int] = defaultdict(int)
    for node in plan.graph.ops():
        ops[node.layer] += 1
    launches: dict[int | None, list[str]] = defaultdict(list)
    for launch in plan.launches:
        launches[launch.layer].append(launch.pattern)
    layers = sorted(set(ops) | set(launches), key=_layer_key)
    return [(layer, ops[layer], launches[layer]) for layer in layers]


def report(plan: Plan, explain: bool = False) -> list[str]:
    graph = plan.graph
    lines = [f"{plan.bucket} plan: {sum(1 for _ in graph.ops())} ops -> {len(plan.launches)} launches, "
             f"{len(plan.kernels())} distinct kernels, {plan.num_slots} scratch buffers"]
    by_layer = defaultdict(list)
    for launch in plan.launches:
        by_layer[launch.layer].append(launch)
    for layer, n_ops, patterns in layer_summary(plan):
        label = "other   " if layer is None else f"layer {layer:>2}"
        lines.append(f"  {label}: {n_ops:>3} ops -> {len(patterns)} launches  {', '.join(patterns)}")
        if explain:
            for node in graph.ops():
                if node.layer == layer:
                    lines.append(f"      op     {node.name}: {node.kind}")
            for launch in by_layer[layer]:
                what = launch.kernel.describe() if launch.kernel is not None else launch.kind
                lines.append(f"      launch {launch.name} [{launch.pattern}] covers {', '.join(launch.nodes)}")
                lines.append(f"             {what}")
    return lines
