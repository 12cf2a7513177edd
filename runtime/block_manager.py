"""Paged KV-cache blocks: per-sequence block tables, reference counts, prefix caching,
copy-on-write.

The block manager owns each sequence's block table (keyed by seq_id) and hands the
tables out; it never touches a Sequence. A full block is identified by a hash chain
over its tokens and everything before it, so two sequences with the same prefix share
the same blocks. Blocks whose count drops to zero go to a free list in LRU order but
keep their hash: until they are handed out again, a later request with that prefix
finds them and skips computing those tokens. A sequence that must write into a block
it shares (after a fork for n > 1) gets a private copy first; the copies are queued
for the model runner.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence as Seq


def chain_hash(parent: int, tokens: tuple[int, ...]) -> int:
    """The prefix-cache hash of a full block given its parent's hash (0 for the first)."""
    return hash((parent, tokens))


@dataclass
class _Allocation:
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chain hashes of its full, registered blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # oldest first
        # what a cached block holds, checked on every hit so a hash collision is a miss
        self.block_key: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # chain hash -> block
        self.allocations: dict[int, _Allocation] = {}  # seq_id -> its blocks
        self.pending_copies: list[tuple[int, int]] = []
        self.cache_queries = 0  # prompt tokens looked up
        self.cache_hits = 0  # of those, found cached

    # -- accounting -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def all_free(self) -> bool:
        return self.num_free == self.num_blocks and not any(self.ref) and not self.allocations

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's blocks, in token order (the manager's own list: read, don't keep)."""
        alloc = self.allocations.get(seq_id)
        return alloc.blocks if alloc is not None else []

    # -- prefix cache -------------------------------------------------------------------
    def claim_prefix(self, seq_id: int, tokens: Seq[int], use_cache: bool = True) -> tuple[list[int], int]:
        """Start the table of a newly admitted sequence with the cached blocks of the
        longest cached prefix of tokens (none without use_cache); returns the table and
        the number of tokens its blocks hold. At least one token is left to compute, and
        the block holding it is never a shared one."""
        assert seq_id not in self.allocations
        alloc = self.allocations[seq_id] = _Allocation()
        if not self.prefix_caching or not use_cache:
            return alloc.blocks, 0
        bs = self.block_size
        self.cache_queries += len(tokens)
        parent = 0
        for i in range((len(tokens) - 1) // bs):
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(parent, block_tokens)
            block = self.cached.get(h)
            if block is None or self.block_key[block] != (parent, block_tokens):
                break
            if self.ref[block] == 0:
                del self.free_blocks[block]
            self.ref[block] += 1
            alloc.blocks.append(block)
            alloc.hashes.append(h)
            parent = h
        num_cached = len(alloc.blocks) * bs
        self.cache_hits += num_cached
        return alloc.blocks, num_cached

    def register_full_blocks(self, seq_id: int, tokens: Seq[int], num_computed: int) -> None:
        """Enter the sequence's newly completed blocks (of its first num_computed
        tokens) into the prefix cache."""
        if not self.prefix_caching:
            return
        alloc = self.allocations[seq_id]
        bs = self.block_size
        while len(alloc.hashes) < num_computed // bs:
            i = len(alloc.hashes)
            parent = alloc.hashes[-1] if alloc.hashes else 0
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(parent, block_tokens)
            block = alloc.blocks[i]
            if h not in self.cached and self.block_key[block] is None:
                self.cached[h] = block
                self.block_key[block] = (parent, block_tokens)
            alloc.hashes.append(h)

    # -- allocation -----------------------------------------------------------------------
    def _pop_free(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        key = self.block_key[block]
        if key is not None:  # evict it from the prefix cache
            h = chain_hash(*key)
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_key[block] = None
        self.ref[block] = 1
        return block

    def blocks_needed(self, seq_id: int, num_computed: int, num_tokens: int) -> int:
        """New blocks (including a copy-on-write) for the sequence, which holds
        num_computed tokens, to hold num_tokens."""
        table = self.allocations[seq_id].blocks
        need = max(self.blocks_for(num_tokens) - len(table), 0)
        write_block = num_computed // self.block_size
        if write_block < len(table) and self.ref[table[write_block]] > 1:
            need += 1
        return need

    def can_grow(self, seq_id: int, num_computed: int, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_computed, num_tokens) <= self.num_free

    def grow(self, seq_id: int, num_computed: int, num_tokens: int) -> list[int]:
        """Make the table hold num_tokens tokens, copying a shared block the tokens past
        num_computed will be written into; returns the table."""
        if self.blocks_needed(seq_id, num_computed, num_tokens) > self.num_free:
            raise RuntimeError("out of KV blocks (the scheduler checks can_grow first)")
        table = self.allocations[seq_id].blocks
        write_block = num_computed // self.block_size
        if write_block < len(table):
            old = table[write_block]
            if self.ref[old] > 1:
                new = self._pop_free()
                self.ref[old] -= 1
                table[write_block] = new
                self.pending_copies.append((old, new))
        while len(table) < self.blocks_for(num_tokens):
            table.append(self._pop_free())
        return table

    def fork(self, parent_id: int, child_id: int) -> list[int]:
        """The child shares all of the parent's blocks (n > 1 completions of one
        prompt); returns the child's table. A parent that already finished (on its
        first token) holds none: the child starts empty and computes everything."""
        assert child_id not in self.allocations
        parent = self.allocations.get(parent_id, _Allocation())
        for b in parent.blocks:
            self.ref[b] += 1
        self.allocations[child_id] = _Allocation(list(parent.blocks), list(parent.hashes))
        return self.allocations[child_id].blocks

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks; a no-op for one that holds none."""
        alloc = self.allocations.pop(seq_id, None)
        if alloc is None:
            return
        # the tail goes back first, so a prefix's first blocks are the last evicted
        for block in reversed(alloc.blocks):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free_blocks[block] = None

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
