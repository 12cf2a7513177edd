"""Continuous batching: which sequences compute how many tokens in the next step.

Each step has a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs). Running sequences go first (decodes, and prompts part-way through a
chunked prefill), oldest first; then waiting ones are admitted, FCFS, their prompts
cut into chunks that fit the budget. When the KV cache cannot hold a running
sequence's next tokens, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later (its prefix
usually still sits in the prefix cache).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fusec.runtime.block_manager import BlockManager
from fusec.runtime.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # tokens already in the cache
    num_tokens: int

    @property
    def completes(self) -> bool:
        """After this chunk the sequence has computed all its tokens: it samples."""
        return self.start + self.num_tokens == len(self.seq)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sequence that already shares its parent's computed blocks."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_grow(seq, seq.num_computed + n):
                self._preempt(self.running[-1], out)  # the newest; possibly seq itself
                if seq.status is SequenceStatus.WAITING:
                    break
            if seq.status is SequenceStatus.WAITING:
                break
            self.blocks.grow(seq, seq.num_computed + n)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not seq.block_table:
                self.blocks.claim_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq, seq.num_computed + n):
                self.blocks.free_seq(seq)  # hold no blocks while waiting
                break
            self.blocks.grow(seq, seq.num_computed + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        out.copies = self.blocks.take_copies()
        return out
