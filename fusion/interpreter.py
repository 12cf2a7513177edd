"""Runs an unfused graph with the numpy reference semantics: the reference model."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fusec.fusion.dtypes import DType, from_storage, round_to
from fusec.fusion.ir import Graph, Node, bind_dims
from fusec.fusion.ops import IN_PLACE, OPS


class Interpreter:
    """Evaluates `graph` node by node.

    Weights are given in storage form and converted to float32 once. State buffers
    (the KV caches) are float32 arrays owned by the caller and updated in place, so
    they persist across calls like a real cache.
    """

    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray]) -> None:
        self.graph = graph
        self.order = list(graph.nodes())
        self.weights: dict[str, np.ndarray] = {}
        for node in graph.nodes("weight"):
            if node.name not in weights:
                raise KeyError(f"missing weight {node.name!r}")
            self.weights[node.name] = decode_weight(node, weights[node.name])

    def new_state(self, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
        """Zeroed float32 state buffers (KV caches) for the given symbolic dims."""
        return {n.name: np.zeros(n.type.bind(dims), dtype=np.float32) for n in self.graph.nodes("state")}

    def run(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        dims: dict[str, int] = {}
        values: dict[str, np.ndarray] = {}
        for node in self.order:
            if node.kind == "input":
                value = from_storage(np.asarray(inputs[node.name], dtype=node.type.dtype.storage), node.type.dtype)
            elif node.kind == "weight":
                value = self.weights[node.name]
            elif node.kind == "state":
                value = state[node.name]
            elif node.kind in IN_PLACE:  # rows written into a state: round them, not the whole cache
                state_at = IN_PLACE[node.kind]
                args = [v if j == state_at or v.dtype.kind != "f" else round_to(v, node.type.dtype)
                        for j, v in enumerate(values[i] for i in node.inputs)]
                value = OPS[node.kind].reference(*args, **node.attrs)
            else:
                spec = OPS[node.kind]
                value = spec.reference(*(values[i] for i in node.inputs), **node.attrs)
                value = round_to(value, node.type.dtype)
            _check_shape(node, value, dims)
            values[node.name] = value
        return {name: values[name] for name in self.graph.outputs}


def decode_weight(node: Node, arr: np.ndarray) -> np.ndarray:
    """A weight's values as float32, from its storage (dtype elements or a block format)."""
    from fusec.kernels.quant import checked_format, dequantize

    fmt = checked_format(node, arr.shape)
    return dequantize(arr, fmt) if fmt else from_storage(arr, node.type.dtype)


def _check_shape(node: Node, value: np.ndarray, dims: dict[str, int]) -> None:
    bind_dims(node, value.shape, dims)
    if node.type.dtype is DType.I32 and value.dtype != np.int32:
        raise ValueError(f"{node.name}: expected int32, got {value.dtype}")
