"""Scheduler over a BlockManager, no model: steps are simulated by schedule() and
update_after_step(), tokens are random. The block invariants hold after every
operation, and once every sequence is gone every block is free."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from test_block_manager import check_invariants
from fusec.runtime.block_manager import BlockManager
from fusec.runtime.scheduler import Scheduler, SchedulerOutput
from fusec.runtime.sequence import SamplingParams, Sequence, SequenceStatus

BS = 4


def make_seq(prompt: list[int], max_len: int, request_id: str = "r", index: int = 0, n: int = 1) -> Sequence:
    return Sequence(request_id, index, prompt, SamplingParams(n=n, temperature=1.0), 0.0, max_len)


def check_scheduler(sched: Scheduler) -> None:
    bm = sched.blocks
    check_invariants(bm)
    assert set(bm.allocations) == {s.seq_id for s in sched.running}, "only running sequences hold blocks"
    assert len(sched.running) <= sched.max_num_seqs, "forks took the running set past max_num_seqs"
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(bm.block_table(seq.seq_id)) >= bm.blocks_for(seq.num_computed)
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.num_computed == 0


def check_chunks(sched: Scheduler, out: SchedulerOutput) -> None:
    """Every chunk fits in its table, and the block it writes into is its own."""
    bm = sched.blocks
    assert out.num_tokens <= sched.max_num_batched_tokens
    assert not bm.pending_copies, "copies left behind for a later step"
    for c in out.chunks:
        assert c.seq.status is SequenceStatus.RUNNING and c.start == c.seq.num_computed and c.num_tokens > 0
        assert c.block_table == bm.block_table(c.seq.seq_id)
        assert len(c.block_table) == bm.blocks_for(c.start + c.num_tokens)
        for b in c.block_table[c.start // BS:]:
            assert bm.ref[b] == 1, "a chunk writes into a shared block"


def step(sched: Scheduler) -> SchedulerOutput:
    had_work = sched.has_work()
    out = sched.schedule()
    assert out.chunks or not had_work, "the scheduler made no progress"
    check_chunks(sched, out)
    sched.update_after_step(out)
    return out


def test_second_identical_prompt_hits_all_full_blocks_but_the_last_tokens():
    sched = Scheduler(BlockManager(32, BS), max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(3 * BS))
    first = make_seq(prompt, 64)
    sched.add(first)
    step(sched)
    first.append_token(0)
    second = make_seq(prompt, 64)
    sched.add(second)
    (chunk,) = step(sched).chunks[1:]
    assert second.num_cached == 2 * BS and chunk.start == 2 * BS and chunk.num_tokens == BS
    assert chunk.block_table[:2] == sched.blocks.block_table(first.seq_id)[:2]
    for seq in (first, second):
        sched.finish(seq, "stop")
    assert sched.blocks.all_free() and not sched.has_work()


def test_fork_shares_then_copies_on_write():
    sched = Scheduler(BlockManager(16, BS), max_num_seqs=8, max_num_batched_tokens=64)
    parent = make_seq(list(range(BS + 1)), 64)
    sched.add(parent)
    step(sched)
    parent.append_token(9)
    child = make_seq(parent.prompt_ids, 64, index=1)
    sched.fork(parent, child)
    child.append_token(8)
    assert child.num_computed == parent.num_computed == BS + 1
    assert sched.blocks.block_table(child.seq_id) == sched.blocks.block_table(parent.seq_id)
    shared = sched.blocks.block_table(parent.seq_id)[1]
    out = sched.schedule()
    assert len(out.copies) == 1 and out.copies[0][0] == shared  # the first writer copies
    tables = [c.block_table for c in out.chunks]
    assert tables[0][0] == tables[1][0] and tables[0][1] != tables[1][1]
    sched.update_after_step(out)
    check_scheduler(sched)
    for seq in (parent, child):
        sched.finish(seq, "length")
    assert sched.blocks.all_free()


def test_a_request_with_n_completions_is_admitted_only_with_seats_for_all():
    """max_num_seqs counts the completions that will fork from a first one: a second
    request waits rather than being admitted into seats the forks need."""
    sched = Scheduler(BlockManager(32, BS), max_num_seqs=3, max_num_batched_tokens=64)
    first, second = make_seq([1] * BS, 64, "a", n=3), make_seq([2] * BS, 64, "b")
    sched.add(first)
    sched.add(second)
    out = step(sched)
    assert [c.seq for c in out.chunks] == [first] and list(sched.waiting) == [second]
    first.append_token(0)
    for index in (1, 2):  # like the engine: the forks sample their first token from the parent's logits
        child = make_seq(first.prompt_ids, 64, "a", index, 3)
        sched.fork(first, child)
        child.append_token(index)
    out = step(sched)
    assert len(sched.running) == 3 and list(sched.waiting) == [second]
    for seq in list(sched.running):
        sched.finish(seq, "stop")
    assert [c.seq for c in step(sched).chunks] == [second]
    sched.finish(second, "stop")
    assert sched.blocks.all_free()


def test_preemption_frees_the_newest_and_readmits_it_first():
    sched = Scheduler(BlockManager(4, BS), max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_seq([1] * BS, 64), make_seq([2] * BS, 64)
    for seq in (old, new):
        sched.add(seq)
    step(sched)
    for seq in (old, new):
        seq.append_token(0)
    step(sched)  # each now holds two blocks: the cache is full
    for seq in (old, new):
        seq.append_token(0)
        seq.append_token(0)
        seq.append_token(0)
        seq.append_token(0)
    out = step(sched)
    assert out.preempted == [new] and [c.seq for c in out.chunks] == [old]
    assert list(sched.waiting) == [new] and new.num_computed == 0 and sched.num_preemptions == 1
    check_scheduler(sched)
    sched.finish(old, "stop")
    out = step(sched)
    assert [c.seq for c in out.chunks] == [new] and new.num_cached == BS  # its prompt block was cached
    sched.finish(new, "stop")
    assert sched.blocks.all_free()


@dataclass
class Counts:
    steps: int = 0
    preempted: int = 0
    copies: int = 0
    forks: int = 0
    cache_hits: int = 0


def simulate(seed: int, prefix_caching: bool, ops: int = 400) -> Counts:
    """Random admissions, steps, forks, finishes and aborts, checking the invariants
    after each; at the end everything is aborted and every block must be free."""
    rng = random.Random(seed)
    max_len = 6 * BS
    num_blocks = rng.randint(max_len // BS + 1, 20)  # a longest sequence plus its copy-on-write
    sched = Scheduler(BlockManager(num_blocks, BS, prefix_caching),
                      max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(1, 3 * BS))
    prefixes = [[rng.randrange(5) for _ in range(rng.randint(1, 3 * BS))] for _ in range(3)]
    live: list[Sequence] = []
    counts = Counts()

    def finish(seq: Sequence, reason: str) -> None:
        sched.finish(seq, reason)
        live.remove(seq)

    def sample(seq: Sequence) -> None:
        seq.append_token(rng.randrange(5))
        if len(seq) >= seq.max_len or rng.random() < 0.05:
            finish(seq, "stop")

    for op in range(ops):
        kind = rng.random()
        if kind < 0.25 or not sched.has_work():
            prompt = (rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randint(0, BS + 2))])
            n = rng.randint(1, min(3, sched.max_num_seqs))
            seq = make_seq(prompt[:max_len - 1], max_len, request_id=f"r{op}", n=n)
            sched.add(seq)
            live.append(seq)
        elif kind < 0.3:
            finish(rng.choice(live), "abort")
        else:
            out = step(sched)
            counts.steps += 1
            counts.preempted += len(out.preempted)
            counts.copies += len(out.copies)
            for c in out.chunks:
                if not c.completes:
                    continue
                parent = c.seq
                sample(parent)
                # like the engine: n > 1 completions fork from the first at its first token
                if parent.index == 0 and len(parent.output_ids) == 1:
                    for index in range(1, parent.params.n):
                        child = make_seq(parent.prompt_ids, max_len, parent.request_id, index, parent.params.n)
                        sched.fork(parent, child)
                        live.append(child)
                        sample(child)
                        counts.forks += 1
        check_scheduler(sched)
        assert set(sched.running) | set(sched.waiting) <= set(live)
    for seq in list(live):
        finish(seq, "abort")
    assert not sched.has_work() and sched.blocks.all_free()
    counts.cache_hits = sched.blocks.cache_hits
    return counts


SEEDS = range(8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_operations_keep_the_block_invariants(seed, prefix_caching):
    assert simulate(seed, prefix_caching).steps > 100


def test_random_operations_reach_preemption_copy_on_write_and_prefix_hits():
    """The property test exercises the hard paths, not only the easy ones."""
    counts = [simulate(seed, True) for seed in SEEDS]
    for field_name in ("preempted", "copies", "forks", "cache_hits"):
        assert sum(getattr(c, field_name) for c in counts) > 0, field_name


@pytest.mark.parametrize("chunked", [True, False])
def test_unchunked_prefill_runs_each_prompt_whole(chunked):
    """--no-enable-chunked-prefill: a prompt the step's remaining budget cannot hold waits
    for the next step instead of being split; with chunking it takes what is left."""
    rng = random.Random(5)
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=64, chunked_prefill=chunked)
    a, b = (make_seq([rng.randrange(1000) for _ in range(40)], 48, request_id=r) for r in "ab")
    sched.add(a)
    sched.add(b)
    first = step(sched)
    assert [(c.seq.request_id, c.num_tokens) for c in first.chunks] == ([("a", 40), ("b", 24)] if chunked
                                                                         else [("a", 40)])
    a.append_token(1)  # a sampled its first token
    second = step(sched)
    assert [(c.seq.request_id, c.num_tokens) for c in second.chunks] == ([("a", 1), ("b", 16)] if chunked
                                                                          else [("a", 1), ("b", 40)])
    check_scheduler(sched)
