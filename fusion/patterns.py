"""Fusion patterns: small graphs of op kinds, matched with networkx's DiGraphMatcher.

A pattern names its nodes by role, says which operand of which role feeds each one,
which roles' values may still be used outside the fused group (`escapes`), the
bucket it serves, an optional extra constraint, and `lower`: the function that turns
a match into a launch of its kernel family. Registries are plain objects built by
`fusec.kernels.registry.default_registry()`; nothing here is global.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher

from fusec.fusion.ir import Graph, Node
from fusec.fusion.ops import OPS

if TYPE_CHECKING:
    from fusec.fusion.plan import Launch, LowerContext

BUCKETS = ("gemv", "gemm")  # small T: fused GEMV kernels; large T: library GEMM + fused row kernels


@dataclass(frozen=True)
class PNode:
    role: str
    kind: str
    inputs: tuple[tuple[str, int], ...] = ()  # (producer role, operand position) inside the pattern


@dataclass
class Match:
    pattern: "Pattern"
    roles: dict[str, Node]
    graph: Graph

    def __getitem__(self, role: str) -> Node:
        return self.roles[role]

    def get(self, role: str) -> Node | None:
        return self.roles.get(role)

    @property
    def names(self) -> set[str]:
        return {n.name for n in self.roles.values()}

    def escapes(self, role: str) -> bool:
        """Is this role's value used outside the group (or a graph output)?"""
        name = self.roles[role].name
        inside = self.names
        return name in self.graph.outputs or any(c not in inside for c in self.graph.consumers(name))


@dataclass(frozen=True)
class Pattern:
    name: str
    priority: int
    nodes: tuple[PNode, ...]
    lower: Callable[[Match, "LowerContext"], "Launch"]
    buckets: tuple[str, ...] = BUCKETS
    escapes: frozenset[str] = frozenset()
    constraint: Callable[[Match], bool] | None = None
    doc: str = ""
    _graph: nx.DiGraph = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.role, kind=n.kind)
        for n in self.nodes:
            for src, pos in n.inputs:
                if g.has_edge(src, n.role):
                    g.edges[src, n.role]["operands"].append(pos)
                else:
                    g.add_edge(src, n.role, operands=[pos])
        object.__setattr__(self, "_graph", g)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(n.kind for n in self.nodes)

    @property
    def anchor(self) -> PNode:
        """The last node: every match maps exactly one graph node to it."""
        return self.nodes[-1]

    def matches(self, graph: Graph, candidates: set[str], op_links: nx.Graph) -> Iterator[Match]:
        """Every structurally valid match among the `candidates` op nodes of `graph`.

        Matching runs DiGraphMatcher per anchor node on its small neighbourhood: the
        candidates within the pattern's size of it in `op_links` (the undirected graph
        of all ops, since pattern nodes may meet only at an outside producer such as a
        QKV GEMV). That finds the same matches as one search over the whole graph at a
        fraction of the cost.
        """
        undirected = op_links
        radius = len(self.nodes)
        anchor = self.anchor
        for name in candidates:
            if graph.node(name).kind != anchor.kind:
                continue
            near = nx.single_source_shortest_path_length(undirected, name, cutoff=radius)
            local = graph.nx.subgraph([n for n in near if n in candidates])
            matcher = DiGraphMatcher(
                local, self._graph,
                node_match=lambda g, p: g["node"].kind == p["kind"],
                edge_match=lambda g, p: set(p["operands"]) <= set(g["operands"]))
            for mapping in matcher.subgraph_monomorphisms_iter():
                if mapping.get(name) != anchor.role:
                    continue
                match = Match(self, {role: graph.node(n) for n, role in mapping.items()}, graph)
                if self._operands_exact(match) and self._internal_values_private(match):
                    yield match

    def _operands_exact(self, match: Match) -> bool:
        """Operands the pattern does not name must come from outside the match."""
        inside = match.names
        for pn in self.nodes:
            named = {pos for _, pos in pn.inputs}
            for pos, src in enumerate(match[pn.role].inputs):
                if pos not in named and src in inside:
                    return False
        return True

    def _internal_values_private(self, match: Match) -> bool:
        sinks = {pn.role for pn in self.nodes} - {src for pn in self.nodes for src, _ in pn.inputs}
        return all(match.escapes(role) is False for role in
                   (pn.role for pn in self.nodes) if role not in self.escapes and role not in sinks)


@dataclass
class Registry:
    patterns: list[Pattern] = field(default_factory=list)

    def register(self, pattern: Pattern) -> Pattern:
        if any(p.name == pattern.name for p in self.patterns):
            raise ValueError(f"pattern {pattern.name!r} is already registered")
        if not is_legal(pattern):
            raise ValueError(f"pattern {pattern.name!r} fuses across a row-wide dependency on a "
                             f"split output (e.g. a norm after a GEMV): it needs a kernel boundary")
        self.patterns.append(pattern)
        self.patterns.sort(key=lambda p: (-p.priority, p.name))
        return pattern

    def __iter__(self) -> Iterator[Pattern]:
        return iter(self.patterns)

    def get(self, name: str) -> Pattern:
        for p in self.patterns:
            if p.name == name:
                return p
        raise KeyError(name)

    def for_bucket(self, bucket: str) -> list[Pattern]:
        return [p for p in self.patterns if bucket in p.buckets]


def is_legal(pattern: Pattern) -> bool:
    """No op in a group may read whole rows of a value that another op of the group
    produces split across blocks (a GEMV's output): that needs a kernel boundary."""
    kinds = {pn.role: pn.kind for pn in pattern.nodes}
    return not any(OPS[kinds[src]].split_output and not OPS[pn.kind].elementwise
                   for pn in pattern.nodes for src, _ in pn.inputs)
