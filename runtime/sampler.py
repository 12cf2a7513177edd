"""Next-token selection for a batch, vectorised with numpy.

Order, as in vLLM: logprobs are taken from the raw model distribution; then
penalties (repetition over prompt + output, frequency and presence over the output),
min_tokens (end tokens masked until then), then greedy argmax or temperature, top-k,
top-p and min-p, and a draw from each sequence's own seeded generator, so a seeded
request gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from typing import Sequence as Seq

import numpy as np

from fusec.runtime.sequence import Logprob, Sequence


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def apply_penalties(logits: np.ndarray, seqs: Seq[Sequence], end_ids: Seq[set[int]]) -> np.ndarray:
    out = logits.astype(np.float32, copy=True)
    vocab = out.shape[1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(seq.tokens, dtype=np.int64))
            vals = out[row, seen]
            out[row, seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and seq.output_ids:
            counts = np.bincount(np.asarray(seq.output_ids, dtype=np.int64), minlength=vocab)[:vocab]
            out[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if len(seq.output_ids) < p.min_tokens:
            banned = [t for t in end_ids[row] if 0 <= t < vocab]
            out[row, banned] = -np.inf
    return out


def _filter(probs: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Zero the probabilities top-k / top-p / min-p exclude (never the most likely token)."""
    if top_k and top_k < probs.size:
        kth = np.partition(probs, -top_k)[-top_k]
        probs = np.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order] / probs.sum()
        keep = np.cumsum(sorted_p) - sorted_p < top_p  # tokens before the mass reaches top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
    if min_p > 0.0:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
    return probs


def sample(logits: np.ndarray, seqs: Seq[Sequence], end_ids: Seq[set[int]]) -> tuple[list[int], list[Logprob | None]]:
    """One token per row of logits [B, V] (float32), and its logprob record if asked."""
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw = log_softmax(logits) if any(want_logprobs) else None
    processed = apply_penalties(logits, seqs, end_ids)
    tokens: list[int] = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            tokens.append(int(np.argmax(processed[row])))
            continue
        z = processed[row].astype(np.float64) / p.temperature
        probs = np.exp(z - z.max())
        probs = _filter(probs, p.top_k, p.top_p, p.min_p)
        cdf = np.cumsum(probs)
        tokens.append(int(min(np.searchsorted(cdf, seq.rng.random() * cdf[-1], side="right"), len(cdf) - 1)))
    records: list[Logprob | None] = []
    for row, (seq, token) in enumerate(zip(seqs, tokens)):
        if raw is None or seq.params.logprobs is None:
            records.append(None)
            continue
        k = seq.params.logprobs
        top_ids = np.argsort(-raw[row], kind="stable")[:k] if k else np.array([], dtype=np.int64)
        records.append(Logprob(token, float(raw[row, token]), [(int(t), float(raw[row, t])) for t in top_ids]))
    return tokens, records
