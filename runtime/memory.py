"""Device memory planning: one activation arena per executor, and the KV cache sized
from what is left of --gpu-memory-utilization."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fusec.errors import InputError
from fusec.fusion.ir import Graph
from fusec.fusion.plan import Plan

ALIGN = 256  # bytes: what cuBLASLt and vectorised loads like


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


BATCH_DIMS = ("T", "S", "S1", "L", "B")  # the dims that shape activations (not NB: the KV cache)


def max_dims(max_tokens: int, max_seqs: int, max_positions: int, block_size: int) -> dict[str, int]:
    """The largest value of every batch dim in a step of at most max_tokens tokens from
    at most max_seqs sequences, each wanting the logits of its last token."""
    seqs = min(max_seqs, max_tokens)
    return {"T": max_tokens, "S": seqs, "S1": seqs + 1, "L": seqs, "B": -(-max_positions // block_size)}


@dataclass(frozen=True)
class ArenaLayout:
    """Byte offsets of the graph inputs and of every plan's buffer slots in one arena."""

    inputs: Mapping[str, int]
    slots: Mapping[tuple[str, int], int]  # (plan bucket, slot) -> offset
    size: int


def arena_layout(graph: Graph, plans: Mapping[str, Plan], dims: Mapping[str, int]) -> ArenaLayout:
    """Inputs first, then the slots; plans run one at a time, so they share the space
    after the inputs."""
    offset, inputs = 0, {}
    for node in graph.nodes("input"):
        inputs[node.name] = offset
        offset += align(int(np.prod(node.type.bind(dims))) * node.type.dtype.itemsize)
    base, size, slots = offset, offset, {}
    for bucket, plan in plans.items():
        widths: dict[int, int] = {}
        for value, slot in plan.slots.items():
            t = graph.node(value).type
            widths[slot] = max(widths.get(slot, 0), align(int(np.prod(t.bind(dims))) * t.dtype.itemsize))
        at = base
        for slot in sorted(widths):
            slots[(bucket, slot)] = at
            at += widths[slot]
        size = max(size, at)
    return ArenaLayout(inputs, slots, size)


def kv_blocks_for_memory(total: int, free: int, utilization: float, bytes_per_block: int,
                         needed_blocks: int) -> int:
    """KV blocks that fit in this process's share of the GPU once everything else is
    placed: utilization * total, less what is already in use (ours and others')."""
    budget = int(total * utilization) - (total - free)
    blocks = max(0, budget // bytes_per_block)
    if blocks < needed_blocks:
        gib = 2 ** 30
        raise InputError(f"--gpu-memory-utilization {utilization} leaves {max(budget, 0) / gib:.2f} GiB for the KV "
                         f"cache: {blocks} blocks, fewer than one sequence of --max-model-len needs "
                         f"({needed_blocks}); raise --gpu-memory-utilization or lower --max-model-len")
    return blocks
