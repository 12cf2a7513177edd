"""Paged KV-cache blocks: reference counts, prefix caching, copy-on-write.

A full block is identified by a hash chain over its tokens and everything before it,
so two sequences with the same prefix share the same blocks. Blocks whose count
drops to zero go to a free list in LRU order but keep their hash: until they are
handed out again, a later request with that prefix finds them and skips computing
those tokens. A sequence that must write into a block it shares (after a fork for
n > 1) gets a private copy first; the copies are queued for the model runner.
"""
from __future__ import annotations

from collections import OrderedDict

from fusec.runtime.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # oldest first
        self.block_key: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # chain hash -> block
        self.chain: dict[int, list[int]] = {}  # seq_id -> chain hashes of its full, registered blocks
        self.pending_copies: list[tuple[int, int]] = []
        self.cache_queries = 0  # prompt tokens looked up
        self.cache_hits = 0  # of those, found cached

    # -- accounting -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def all_free(self) -> bool:
        return self.num_free == self.num_blocks and not any(self.ref)

    # -- prefix cache -------------------------------------------------------------------
    def _key(self, parent: int, tokens: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        key = (parent, tokens)
        return hash(key), parent, tokens

    def claim_prefix(self, seq: Sequence) -> int:
        """Give a newly admitted sequence the cached blocks of its longest cached prefix;
        returns the number of tokens they hold. At least one token is left to compute,
        and the block holding it is never a shared one."""
        assert not seq.block_table and seq.num_computed == 0
        self.chain[seq.seq_id] = []
        if not self.prefix_caching:
            return 0
        tokens, bs = seq.tokens, self.block_size
        self.cache_queries += len(tokens)
        parent = 0
        for i in range((len(tokens) - 1) // bs):
            h, parent_h, block_tokens = self._key(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            block = self.cached.get(h)
            if block is None or self.block_key[block] != (parent_h, block_tokens):
                break
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1
            seq.block_table.append(block)
            self.chain[seq.seq_id].append(h)
            parent = h
        seq.num_computed = seq.num_cached = len(seq.block_table) * bs
        self.cache_hits += seq.num_cached
        return seq.num_cached

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter the sequence's newly completed blocks into the prefix cache."""
        if not self.prefix_caching:
            return
        chain = self.chain.setdefault(seq.seq_id, [])
        tokens, bs = seq.tokens, self.block_size
        while len(chain) < seq.num_computed // bs:
            i = len(chain)
            h, parent_h, block_tokens = self._key(chain[-1] if chain else 0, tuple(tokens[i * bs:(i + 1) * bs]))
            block = seq.block_table[i]
            if h not in self.cached and self.block_key[block] is None:
                self.cached[h] = block
                self.block_key[block] = (parent_h, block_tokens)
            chain.append(h)

    # -- allocation -----------------------------------------------------------------------
    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.block_key[block]
        if key is not None:  # evict it from the prefix cache
            h = hash(key)
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_key[block] = None
        self.ref[block] = 1
        return block

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks (including a copy-on-write) to hold num_tokens tokens."""
        need = max(self.blocks_for(num_tokens) - len(seq.block_table), 0)
        write_block = seq.num_computed // self.block_size
        if write_block < len(seq.block_table) and self.ref[seq.block_table[write_block]] > 1:
            need += 1
        return need

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make seq's table hold num_tokens tokens, copying a shared block it will write."""
        if self.blocks_needed(seq, num_tokens) > self.num_free:
            raise RuntimeError("out of KV blocks (the scheduler checks can_grow first)")
        write_block = seq.num_computed // self.block_size
        if write_block < len(seq.block_table):
            old = seq.block_table[write_block]
            if self.ref[old] > 1:
                new = self._pop_free()
                self.ref[old] -= 1
                seq.block_table[write_block] = new
                self.pending_copies.append((old, new))
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._pop_free())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks (n > 1 completions of one prompt)."""
        child.block_table = list(parent.block_table)
        for b in child.block_table:
            self.ref[b] += 1
        child.num_computed = parent.num_computed
        child.num_cached = parent.num_cached
        self.chain[child.seq_id] = list(self.chain.get(parent.seq_id, []))

    def free_seq(self, seq: Sequence) -> None:
        # the tail goes back first, so a prefix's first blocks are the last evicted
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_computed = 0
        self.chain.pop(seq.seq_id, None)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
