"""Continuous batching: which sequences compute how many tokens in the next step.

Each step has a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs). Running sequences go first (decodes, and prompts part-way through a
chunked prefill), oldest first; then waiting ones are admitted, FCFS, their prompts
cut into chunks that fit the budget. When the KV cache cannot hold a running
sequence's next tokens, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later (its prefix
usually still sits in the prefix cache).

The scheduler is the one writer of a sequence's scheduling state: it asks the block
manager for block tables and records what each step computed, what forked and what
finished.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fusec.runtime.block_manager import BlockManager
from fusec.runtime.sequence import Sequence, SequenceStatus

# Logits rows a step may spend on prompt_logprobs beyond one per sequence: it bounds the
# logits buffer (rows x vocab floats); a long scored prompt takes several steps.
PROMPT_LOGPROB_ROWS = 64


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # tokens already in the cache
    num_tokens: int
    block_table: list[int]  # the sequence's blocks, valid until the next schedule()
    all_logits: bool = False  # the logits of every token, not just the last (prompt_logprobs)

    @property
    def completes(self) -> bool:
        """After this chunk the sequence has computed all its tokens: it samples."""
        return self.start + self.num_tokens == len(self.seq)


def seats_taken(seq: Sequence) -> int:
    """Of max_num_seqs, what a running sequence holds: a first completion that has not
    sampled yet holds seats for the n - 1 that fork from it at its first token too, so
    forks never take the running set past the cap."""
    return seq.params.n if seq.index == 0 and not seq.output_ids else 1


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = True) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # off: a prompt waits until one step's budget holds all of it (vLLM's
        # --no-enable-chunked-prefill; scored prompts still go 64 rows a step)
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run child alongside parent, sharing the blocks of everything parent computed."""
        self.blocks.fork(parent.seq_id, child.seq_id)
        child.num_computed = parent.num_computed
        child.num_cached = parent.num_cached
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark a sequence finished ("stop", "length" or "abort"), drop it and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """The step computed every scheduled chunk: advance the sequences and enter
        their newly full blocks into the prefix cache."""
        for c in out.chunks:
            c.seq.num_computed += c.num_tokens
            self.blocks.register_full_blocks(c.seq.seq_id, c.seq.tokens, c.seq.num_computed)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _free(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scored_rows = PROMPT_LOGPROB_ROWS
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            scores = seq.scores_prompt
            if scores:
                if not scored_rows:
                    i += 1  # its logits rows are spent this step
                    continue
                n = min(n, scored_rows)
            while not self.blocks.can_grow(seq.seq_id, seq.num_computed, seq.num_computed + n):
                self._preempt(self.running[-1], out)  # the newest; possibly seq itself
                if seq.status is SequenceStatus.WAITING:
                    break
            if seq.status is SequenceStatus.WAITING:
                break
            table = self.blocks.grow(seq.seq_id, seq.num_computed, seq.num_computed + n)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n, table, scores))
            budget -= n
            scored_rows -= n if scores else 0
            i += 1
        seats = sum(map(seats_taken, self.running))
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            if seats + seats_taken(seq) > self.max_num_seqs:
                break
            scores = seq.scores_prompt
            if scores and not scored_rows:
                break
            if not self.chunked_prefill and not scores and len(seq) > budget:
                break  # the prompt runs whole: a later step's budget holds it (cache hits aside)
            # a scored prompt is computed whole: cached positions would have no logits
            _, seq.num_cached = self.blocks.claim_prefix(seq.seq_id, seq.tokens, use_cache=not scores)
            seq.num_computed = seq.num_cached
            n = min(seq.num_uncomputed, budget)
            if scores:
                n = min(n, scored_rows)
            if not self.blocks.can_grow(seq.seq_id, seq.num_computed, seq.num_computed + n):
                self._free(seq)  # hold no blocks while waiting
                break
            table = self.blocks.grow(seq.seq_id, seq.num_computed, seq.num_computed + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seats += seats_taken(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n, table, scores))
            budget -= n
            scored_rows -= n if scores else 0
        out.copies = self.blocks.take_copies()
        return out
