"""Bytes of weights a step's plan reads: a matrix whole, an embedding gather only its
tokens' rows, a routed-expert launch only the experts its tokens were routed to (what
makes a mixture-of-experts decode cheap: a token reads top_k of the experts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fusec.fusion.ir import Node
from fusec.fusion.plan import Plan


@dataclass(frozen=True)
class WeightTraffic:
    read: int  # bytes of weights the step reads
    total: int  # bytes of all the graph's weights
    by_launch: tuple[tuple[str, int], ...]  # (launch name, bytes it reads), in plan order

    @property
    def fraction(self) -> float:
        return self.read / self.total if self.total else 0.0

    def describe(self) -> str:
        return describe(self.read, self.total)


def describe(read: int, total: int) -> str:
    """"12.3 MiB of 45.6 MiB of weights (27%)"."""
    return f"{_size(read)} of {_size(total)} of weights ({100 * read / total if total else 0:.0f}%)"


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} GiB"


def experts_read(route_node: Node, tokens: int, route: np.ndarray | None) -> int:
    """Distinct experts (routed and shared) a step's tokens run: counted from the router's
    output where given, else the most `tokens` can pick (exact for one token)."""
    a = route_node.attrs
    if route is not None:
        slots = a["top_k"] + a["shared"]
        return len(np.unique(np.asarray(route)[:tokens, :slots].astype(np.int64)))
    return min(a["experts"], tokens * a["top_k"]) + a["shared"]


def weight_traffic(plan: Plan, weight_bytes: Mapping[str, int], tokens: int,
                   routes: Mapping[str, np.ndarray] | None = None) -> WeightTraffic:
    """The weights `plan` reads in a step of `tokens` tokens; `routes` maps a moe_route
    value to its output in that step (without it, each token is taken to pick experts no
    other token picked: exact for one token, an upper bound for more)."""
    graph = plan.graph
    by_launch = []
    for launch in plan.launches:
        read: dict[str, int] = {}
        for name in launch.nodes:
            node = graph.node(name)
            for pos, src in enumerate(node.inputs):
                source = graph.node(src)
                if source.kind != "weight":
                    continue
                size = weight_bytes[src]
                if node.kind == "embed":  # the gathered rows only
                    size = min(size, size // source.type.shape[0] * tokens)
                elif node.kind == "moe_matmul" and pos == 2:
                    route = graph.node(node.inputs[1])
                    size = size // node.attrs["experts"] * experts_read(route, tokens, (routes or {}).get(route.name))
                read[src] = max(read.get(src, 0), size)
        by_launch.append((launch.name, sum(read.values())))
    total = sum(weight_bytes[n.name] for n in graph.nodes("weight"))
    return WeightTraffic(sum(b for _, b in by_launch), total, tuple(by_launch))
