"""BlockManager on its own: prefix hits, hash verification, LRU eviction, copy-on-write."""
from __future__ import annotations

from collections import Counter

import pytest

from fusec.runtime import block_manager
from fusec.runtime.block_manager import BlockManager

BS = 4


def check_invariants(bm: BlockManager) -> None:
    """Reference counts match the tables; every block is either free or referenced."""
    held = Counter(b for alloc in bm.allocations.values() for b in alloc.blocks)
    for alloc in bm.allocations.values():
        assert len(set(alloc.blocks)) == len(alloc.blocks), f"a table holds a block twice: {alloc.blocks}"
    assert all(bm.ref[b] == held[b] for b in range(bm.num_blocks)), (bm.ref, held)
    assert not set(bm.free_blocks) & set(held), "a referenced block is on the free list"
    assert set(bm.free_blocks) | set(held) == set(range(bm.num_blocks)), "a block is neither free nor referenced"
    for h, b in bm.cached.items():
        assert bm.block_key[b] is not None and block_manager.chain_hash(*bm.block_key[b]) == h


def compute(bm: BlockManager, seq_id: int, tokens: list[int]) -> list[int]:
    """Admit a sequence and compute all of its tokens in one step, as the scheduler would."""
    _, cached = bm.claim_prefix(seq_id, tokens)
    table = bm.grow(seq_id, cached, len(tokens))
    bm.register_full_blocks(seq_id, tokens, len(tokens))
    return table


def test_prefix_hit_never_covers_the_last_token():
    bm = BlockManager(16, BS)
    prompt = list(range(100, 100 + 2 * BS))  # exactly two full blocks
    first = list(compute(bm, 1, prompt))
    table, cached = bm.claim_prefix(2, prompt)
    assert cached == BS and table == first[:1]  # the block of the last token is computed again
    table, cached = bm.claim_prefix(3, prompt + [7, 8, 9])
    assert cached == 2 * BS and table == first
    assert bm.cache_hits == 3 * BS and bm.cache_queries == 3 * len(prompt) + 3
    check_invariants(bm)
    for seq_id in (1, 2, 3):
        bm.free(seq_id)
    assert bm.all_free()


def test_prefix_caching_off_claims_nothing():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    prompt = list(range(3 * BS))
    compute(bm, 1, prompt)
    assert bm.claim_prefix(2, prompt) == ([], 0) and not bm.cached
    bm.free(1)
    bm.free(2)
    assert bm.all_free()


def test_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(block_manager, "chain_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(16, BS)
    a = [1] * BS + [2] * BS + [0]
    b = [3] * BS + [2] * BS + [0]
    first = compute(bm, 1, a)
    assert bm.claim_prefix(2, b) == ([], 0)  # same hash, other tokens: not a's block
    assert bm.claim_prefix(3, a) == (first[:1], BS)  # a's own first block still hits
    check_invariants(bm)


def test_eviction_takes_the_least_recently_freed_and_a_prefix_tail_first():
    bm = BlockManager(6, BS)
    a = [1] * BS + [2] * BS + [3] * BS + [0]  # three full blocks and one more
    b = [4] * BS + [0]
    table_a = list(compute(bm, 1, a))
    table_b = list(compute(bm, 2, b))
    bm.free(1)  # freed first: evicted first, its tail before its head
    bm.free(2)
    assert list(bm.free_blocks) == table_a[::-1] + table_b[::-1]
    table_c = compute(bm, 3, [9] * (2 * BS))
    assert table_c == [table_a[3], table_a[2]]
    bm.free(3)
    # a's first two blocks survived; its third was handed out and lost its hash
    assert bm.claim_prefix(4, a) == (table_a[:2], 2 * BS)
    assert bm.claim_prefix(5, b) == (table_b[:1], BS)  # freed later, so still cached
    check_invariants(bm)


def test_copy_on_write_gives_the_writer_a_private_copy():
    bm = BlockManager(8, BS)
    prompt = list(range(BS + 2))  # the second block is partial
    parent = list(compute(bm, 1, prompt))
    child = bm.fork(1, 2)
    assert child == parent and all(bm.ref[b] == 2 for b in parent)
    assert bm.blocks_needed(2, len(prompt), len(prompt) + 1) == 1  # the copy
    child = bm.grow(2, len(prompt), len(prompt) + 1)
    assert child[0] == parent[0] and child[1] != parent[1]
    assert bm.take_copies() == [(parent[1], child[1])] and bm.take_copies() == []
    assert bm.block_table(1) == parent and bm.ref[parent[1]] == 1 and bm.ref[parent[0]] == 2
    # the parent now owns its block alone and writes in place
    assert bm.grow(1, len(prompt), len(prompt) + 1) == parent and bm.take_copies() == []
    check_invariants(bm)
    bm.free(1)
    bm.free(2)
    assert bm.all_free()


def test_growing_past_the_free_blocks_raises():
    bm = BlockManager(2, BS)
    bm.claim_prefix(1, [0] * (3 * BS))
    assert not bm.can_grow(1, 0, 3 * BS)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.grow(1, 0, 3 * BS)
    bm.free(1)
    assert bm.all_free()
