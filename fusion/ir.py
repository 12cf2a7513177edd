"""The graph IR: a networkx DiGraph of typed values.

Every node is a `Node`: a graph input (batch metadata), a weight, a state buffer (the
paged KV cache) or an op. Edges run producer -> consumer and record the operand
positions, so networkx's matchers and traversals see the real dataflow. Shapes are
static except for named symbolic dimensions: "T" (tokens in the batch) for
activations, and "S" (sequences), "B" (blocks per sequence) and "NB" (cache blocks)
for metadata and state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import networkx as nx

from fusec.fusion.dtypes import DType

Dim = int | str
SOURCE_KINDS = ("input", "weight", "state")


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: DType

    def __str__(self) -> str:
        return f"{self.dtype.value}[{', '.join(str(d) for d in self.shape)}]"

    def bind(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)


@dataclass
class Node:
    name: str
    kind: str
    inputs: tuple[str, ...]
    type: TensorType
    attrs: dict[str, Any] = field(default_factory=dict)
    layer: int | None = None  # which transformer layer built it (for --explain and planning)

    @property
    def format(self) -> str | None:
        """A weight's block format (None: stored as plain `dtype` elements)."""
        return self.attrs.get("format")

    @property
    def is_source(self) -> bool:
        return self.kind in SOURCE_KINDS

    def __str__(self) -> str:
        attrs = "".join(f", {k}={v}" for k, v in self.attrs.items() if k != "inv_freq")
        return f"{self.name}: {self.type} = {self.kind}({', '.join(self.inputs)}{attrs})"


def bind_dims(node: Node, shape: tuple[int, ...], dims: dict[str, int]) -> None:
    """Bind node's symbolic dims from a concrete shape; a shape that disagrees is an
    error (never an out-of-bounds read in a kernel)."""
    if len(shape) != len(node.type.shape):
        raise ValueError(f"{node.name}: rank {len(shape)}, expected {node.type}")
    for want, got in zip(node.type.shape, shape):
        if isinstance(want, str):
            if dims.setdefault(want, got) != got:
                raise ValueError(f"{node.name}: dim {want}={got}, bound to {dims[want]} earlier")
        elif want != got:
            raise ValueError(f"{node.name}: shape {tuple(shape)}, expected {node.type}")


class Graph:
    """A dataflow graph of `Node`s with an ordered list of graph outputs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nx = nx.DiGraph()
        self.outputs: list[str] = []
        self._order: dict[str, int] = {}
        self._sorted: list[Node] | None = None  # the topological order, until the next _add

    # -- building -----------------------------------------------------------------
    def _add(self, node: Node) -> str:
        if node.name in self.nx:
            raise ValueError(f"duplicate node name {node.name!r}")
        for pos, src in enumerate(node.inputs):
            if src not in self.nx:
                raise ValueError(f"{node.name}: unknown input {src!r}")
        self.nx.add_node(node.name, node=node)
        self._order[node.name] = len(self._order)
        self._sorted = None
        for pos, src in enumerate(node.inputs):
            if self.nx.has_edge(src, node.name):
                self.nx.edges[src, node.name]["operands"].append(pos)
            else:
                self.nx.add_edge(src, node.name, operands=[pos])
        return node.name

    def input(self, name: str, shape: tuple[Dim, ...], dtype: DType = DType.I32) -> str:
        return self._add(Node(name, "input", (), TensorType(tuple(shape), dtype)))

    def weight(self, name: str, shape: tuple[Dim, ...], dtype: DType, format: str | None = None) -> str:
        """A weight of `shape` whose elements are `dtype` values. With a `format` (a block
        format of kernels/quant.py: GGUF's, or a banded one) it is stored in that format's
        blocks and decodes to `dtype`."""
        attrs = {"format": format} if format else {}
        return self._add(Node(name, "weight", (), TensorType(tuple(shape), dtype), attrs))

    def state(self, name: str, shape: tuple[Dim, ...], dtype: DType) -> str:
        return self._add(Node(name, "state", (), TensorType(tuple(shape), dtype)))

    def op(self, kind: str, inputs: list[str] | tuple[str, ...], shape: tuple[Dim, ...],
           dtype: DType, name: str, layer: int | None = None, **attrs: Any) -> str:
        from fusec.fusion.ops import OPS  # ops imports ir for types; keep the cycle local

        spec = OPS.get(kind)
        if spec is None:
            raise ValueError(f"{name}: unknown op kind {kind!r}")
        if len(inputs) != spec.arity:
            raise ValueError(f"{name}: {kind} takes {spec.arity} inputs, got {len(inputs)}")
        return self._add(Node(name, kind, tuple(inputs), TensorType(tuple(shape), dtype), dict(attrs), layer))

    def set_outputs(self, *names: str) -> None:
        for n in names:
            if n not in self.nx:
                raise ValueError(f"unknown output {n!r}")
        self.outputs = list(names)

    def with_outputs(self, *names: str) -> Graph:
        """The same nodes (shared, not copied) returning other outputs: what DCE, fusion
        and buffer planning keep depends on the outputs."""
        g = Graph(self.name)
        g.nx, g._order = self.nx.copy(), dict(self._order)
        g.set_outputs(*names)
        return g

    # -- reading ------------------------------------------------------------------
    def node(self, name: str) -> Node:
        return self.nx.nodes[name]["node"]

    def __contains__(self, name: str) -> bool:
        return name in self.nx

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def nodes(self, kind: str | None = None) -> Iterator[Node]:
        """Nodes in a deterministic topological order (ties broken by insertion). The
        order is sorted once and kept: executors ask for it on hot paths."""
        if self._sorted is None:
            names = nx.lexicographical_topological_sort(self.nx, key=self._order.__getitem__)
            self._sorted = [self.node(name) for name in names]
        return iter(self._sorted if kind is None else [n for n in self._sorted if n.kind == kind])

    def ops(self) -> Iterator[Node]:
        return (n for n in self.nodes() if not n.is_source)

    def consumers(self, name: str) -> list[str]:
        return sorted(self.nx.successors(name), key=self._order.__getitem__)

    def __str__(self) -> str:
        lines = [f"graph {self.name}"] + [f"  {n}" for n in self.nodes()]
        lines.append(f"  return {', '.join(self.outputs)}")
        return "\n".join(lines)
