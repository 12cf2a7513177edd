"""Device memory planning: one activation arena per executor, and the KV cache sized
once weights, activations and sampler buffers are placed (on a GPU: from what is left
of --gpu-memory-utilization; on the CPU: --kv-cache-gb)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fusec.errors import InputError
from fusec.fusion.ir import Graph
from fusec.fusion.plan import Plan
from fusec.runtime.config import EngineConfig

ALIGN = 256  # bytes: what cuBLASLt and vectorised loads like


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


BATCH_DIMS = ("T", "S", "S1", "L", "B")  # the dims that shape activations (not NB: the KV cache)


def max_dims(max_tokens: int, max_seqs: int, max_positions: int, block_size: int,
             extra_logit_rows: int = 0) -> dict[str, int]:
    """The largest value of every batch dim in a step of at most max_tokens tokens from
    at most max_seqs sequences, each wanting the logits of its last token, plus up to
    extra_logit_rows more logits rows (prompt_logprobs)."""
    seqs = min(max_seqs, max_tokens)
    return {"T": max_tokens, "S": seqs, "S1": seqs + 1, "L": min(seqs + extra_logit_rows, max_tokens),
            "B": -(-max_positions // block_size)}


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


@dataclass(frozen=True)
class MemoryUse:
    """Step one of the KV sizing handshake: the device's (free, total) bytes before this
    engine placed anything and after its weights, activations and sampler buffers."""

    free_before: int
    free_after: int
    total: int

    @property
    def ours(self) -> int:
        return max(0, self.free_before - self.free_after)


def kv_cache_blocks(config: EngineConfig, device_kind: str, memory: MemoryUse | None, bytes_per_block: int,
                    max_model_len: int) -> int:
    """Step two of the KV sizing handshake: blocks for the cache. Refuses a cache that
    cannot hold one sequence of max_model_len tokens."""
    needed = -(-max_model_len // config.block_size)
    if config.num_kv_blocks is None and device_kind == "cuda" and memory is not None:
        return kv_blocks_for_memory(memory, config.gpu_memory_utilization, bytes_per_block, needed)
    blocks = config.num_kv_blocks
    if blocks is None:
        blocks = int(config.kv_cache_gb * 2 ** 30 // bytes_per_block)
    if blocks < needed:
        raise InputError(f"the KV cache holds {blocks} blocks of {config.block_size} tokens, fewer than one "
                         f"sequence of --max-model-len {max_model_len} needs ({needed}); raise the KV cache size "
                         f"or lower --max-model-len")
    return blocks


def kv_blocks_for_memory(memory: MemoryUse, utilization: float, bytes_per_block: int, needed_blocks: int) -> int:
    """KV blocks that fit in this engine's share of the GPU once everything else is
    placed: utilization * total, less what the engine itself placed (as vLLM counts it:
    other processes' memory is theirs, so several servers can each take a share), and
    never more than is free."""
    budget = min(int(memory.total * utilization) - memory.ours, memory.free_after)
    blocks = max(0, budget // bytes_per_block)
    if blocks < needed_blocks:
        gib = 2 ** 30
        raise InputError(f"--gpu-memory-utilization {utilization} leaves {max(budget, 0) / gib:.2f} GiB for the KV "
                         f"cache: {blocks} blocks, fewer than one sequence of --max-model-len needs "
                         f"({needed_blocks}); raise --gpu-memory-utilization or lower --max-model-len")
    return blocks
