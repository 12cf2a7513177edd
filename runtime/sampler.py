"""Next-token selection for a batch.

Order, as in vLLM: logprobs come from the raw model distribution; then penalties
(repetition over prompt + output, frequency and presence over the output), logit_bias, min_tokens
(end tokens banned until then), structured-output masks (tokens a grammar forbids
dropped), then greedy argmax, or temperature with top-k, top-p
and min-p and a Gumbel-max draw whose uniforms are hash(seed, step, token), so a
seeded request gives the same tokens whatever else is in the batch.

`SamplingBatch` is the batch as flat arrays; `KernelSampler` runs it through the
compiled sampling kernels (`fusec.kernels.sampling`) on the executor's device, and
`reference_sample` is the numpy oracle those kernels are tested against (and what the
reference executor uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence as Seq

import numpy as np

from fusec.fusion.dtypes import DType
from fusec.kernels.elementwise import GatherRows
from fusec.kernels.random import uniform
from fusec.kernels.sampling import MAX_LOGPROBS, ApplyPenalties, ApplyTokenMask, SampleRows, TopLogprobs
from fusec.runtime.sequence import Logprob, Sequence


@dataclass
class SamplingBatch:
    """Per sampled row r: the logits row it reads and its parameters; penalties as
    sparse entries starts[r]..starts[r+1]-1 of (token, rep, sub); the rows under a
    structured-output constraint with their allowed tokens as packed bitmasks."""

    rows: np.ndarray  # int32 [B]
    temperature: np.ndarray  # float32 [B]; 0 = greedy
    top_k: np.ndarray  # int32 [B]; 0 = off
    top_p: np.ndarray  # float32 [B]
    min_p: np.ndarray  # float32 [B]
    seeds: np.ndarray  # int32 [B] (uint32 bits)
    counters: np.ndarray  # int32 [B]: tokens generated so far
    starts: np.ndarray  # int32 [B + 1]
    tokens: np.ndarray  # int32 [E]
    rep: np.ndarray  # float32 [E]
    sub: np.ndarray  # float32 [E]; +inf bans the token
    logprob_rows: np.ndarray  # int32 [R]: batch rows that want logprobs
    num_logprobs: np.ndarray  # int32 [R]: how many top logprobs each wants
    mask_rows: np.ndarray  # int32 [M]: batch rows under a token mask
    masks: np.ndarray  # int32 [M, ceil(V / 32)]: bit t % 32 of word t // 32 set = token t allowed

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def k(self) -> int:
        return int(self.num_logprobs.max()) if len(self.num_logprobs) else 0

    @classmethod
    def build(cls, rows: Seq[int], seqs: Seq[Sequence], end_ids: Seq[set[int]], vocab: int,
              masks: Seq[np.ndarray | None] | None = None) -> "SamplingBatch":
        """masks[i]: seqs[i]'s allowed tokens (a bitmask row), or None when it is free."""
        starts, tokens, rep, sub = [0], [], [], []
        for seq, ends in zip(seqs, end_ids):
            edits = _penalty_edits(seq, ends, vocab)
            for token in sorted(edits):
                tokens.append(token)
                rep.append(edits[token][0])
                sub.append(edits[token][1])
            starts.append(len(tokens))
        params = [s.params for s in seqs]
        want = [(i, p.logprobs) for i, p in enumerate(params) if p.logprobs is not None]
        masked = [(i, m) for i, m in enumerate(masks or []) if m is not None]
        return cls(
            rows=np.asarray(rows, np.int32),
            temperature=np.asarray([0.0 if p.greedy else p.temperature for p in params], np.float32),
            top_k=np.asarray([p.top_k for p in params], np.int32),
            top_p=np.asarray([p.top_p for p in params], np.float32),
            min_p=np.asarray([p.min_p for p in params], np.float32),
            seeds=np.asarray([s.seed for s in seqs], np.uint32).view(np.int32),
            counters=np.asarray([len(s.output_ids) for s in seqs], np.int32),
            starts=np.asarray(starts, np.int32),
            tokens=np.asarray(tokens, np.int32),
            rep=np.asarray(rep, np.float32),
            sub=np.asarray(sub, np.float32),
            logprob_rows=np.asarray([i for i, _ in want], np.int32),
            num_logprobs=np.asarray([k for _, k in want], np.int32),
            mask_rows=np.asarray([i for i, _ in masked], np.int32),
            masks=(np.stack([m for _, m in masked]).astype(np.int32) if masked
                   else np.zeros((0, (vocab + 31) // 32), np.int32)),
        )


def _penalty_edits(seq: Sequence, ends: set[int], vocab: int) -> dict[int, tuple[float, float]]:
    """token -> (rep, sub) for one sequence."""
    p = seq.params
    edits: dict[int, list[float]] = {}
    if p.repetition_penalty != 1.0:
        for t in np.unique(np.asarray(seq.tokens, np.int64)).tolist():
            edits[t] = [p.repetition_penalty, 0.0]
    if (p.frequency_penalty or p.presence_penalty) and seq.output_ids:
        ids, counts = np.unique(np.asarray(seq.output_ids, np.int64), return_counts=True)
        for t, c in zip(ids.tolist(), counts.tolist()):
            edits.setdefault(t, [1.0, 0.0])[1] += p.frequency_penalty * c + p.presence_penalty
    for t, bias in (p.logit_bias or {}).items():
        edits.setdefault(t, [1.0, 0.0])[1] -= bias
    if len(seq.output_ids) < p.min_tokens:
        for t in ends:
            if 0 <= t < vocab:
                edits.setdefault(t, [1.0, 0.0])[1] = np.inf
    return {t: (r, s) for t, (r, s) in edits.items()}


@dataclass
class SampleResult:
    tokens: np.ndarray  # int32 [B]
    picked: np.ndarray  # float32 [B]: the chosen token's logit after penalties
    orig: np.ndarray  # float32 [E]: logits the penalties replaced
    lse: np.ndarray  # float32 [R]: raw log-sum-exp of each logprob row
    top_ids: np.ndarray  # int32 [R, MAX_LOGPROBS]
    top_vals: np.ndarray  # float32 [R, MAX_LOGPROBS]: raw logits

    def nonfinite(self, batch: SamplingBatch) -> np.ndarray:
        """bool [B]: the rows whose raw logits were not all finite, from what was read back
        anyway: a row of NaN picks a NaN logit, and a logprob row's log-sum-exp is NaN or
        infinite when any of its logits is NaN or +inf. Penalties and masks never make NaN."""
        bad = np.isnan(self.picked)
        bad[batch.logprob_rows] |= ~np.isfinite(self.lse)
        return bad

    def records(self, batch: SamplingBatch) -> list[Logprob | None]:
        out: list[Logprob | None] = [None] * len(batch)
        for j, (row, k) in enumerate(zip(batch.logprob_rows.tolist(), batch.num_logprobs.tolist())):
            token = int(self.tokens[row])
            raw = float(self.picked[row])
            a, b = int(batch.starts[row]), int(batch.starts[row + 1])
            hit = np.nonzero(batch.tokens[a:b] == token)[0]
            if len(hit):  # a penalty replaced it: the raw value was saved
                raw = float(self.orig[a + hit[0]])
            lse = float(self.lse[j])
            top = [(int(t), float(v) - lse) for t, v in zip(self.top_ids[j, :k], self.top_vals[j, :k])]
            out[row] = Logprob(token, raw - lse, top)
        return out


def prompt_logprobs(rows: np.ndarray, targets: Seq[int], k: int) -> list[Logprob]:
    """prompt_logprobs for consecutive prompt positions: rows[i] are the raw logits before
    prompt token targets[i]; its logprob, its rank (1 = the most likely) and the k most
    likely tokens. Raw model distribution, as the sampled tokens' logprobs."""
    x = np.asarray(rows, np.float64)
    lse = x.max(axis=1, keepdims=True)
    lse += np.log(np.exp(x - lse).sum(axis=1, keepdims=True))
    at = np.arange(len(x))
    picked = x[at, np.asarray(targets)]
    ranks = 1 + (x > picked[:, None]).sum(axis=1)
    out = []
    for i in range(len(x)):
        top = np.argsort(-x[i], kind="stable")[:k] if k else np.zeros(0, np.int64)
        out.append(Logprob(int(targets[i]), float(picked[i] - lse[i, 0]),
                           [(int(t), float(x[i, t] - lse[i, 0])) for t in top], int(ranks[i])))
    return out


# -- the numpy oracle ------------------------------------------------------------------------
def reference_sample(logits: np.ndarray, batch: SamplingBatch) -> SampleResult:
    """What the sampling kernels compute, in numpy (float64 where they use float32)."""
    raw = np.asarray(logits, np.float32)[batch.rows]
    B = len(raw)
    R = len(batch.logprob_rows)
    lse = np.zeros(R, np.float32)
    top_ids = np.zeros((R, MAX_LOGPROBS), np.int32)
    top_vals = np.zeros((R, MAX_LOGPROBS), np.float32)
    for j, (row, k) in enumerate(zip(batch.logprob_rows, batch.num_logprobs)):
        wide = raw[row].astype(np.float64)
        m = wide.max()
        lse[j] = m + np.log(np.exp(wide - m).sum())
        order = np.argsort(-raw[row], kind="stable")[:k]
        top_ids[j, :k], top_vals[j, :k] = order, raw[row, order]
    x, orig = processed_rows(raw, batch)
    tokens = np.zeros(B, np.int32)
    for r in range(B):
        t = batch.temperature[r]
        tokens[r] = np.argmax(x[r]) if t <= 0 else _draw(x[r], batch, r)
    picked = x[np.arange(B), tokens]
    return SampleResult(tokens, picked, orig, lse, top_ids, top_vals)


def processed_rows(rows: np.ndarray, batch: SamplingBatch) -> tuple[np.ndarray, np.ndarray]:
    """The batch's logits rows [B, V] with its penalty entries and token masks applied
    (a copy), and the values the penalty entries replaced."""
    x = np.array(rows, np.float32)
    orig = np.zeros(len(batch.tokens), np.float32)
    for r in range(len(x)):
        a, b = batch.starts[r], batch.starts[r + 1]
        toks = batch.tokens[a:b]
        v = x[r, toks]
        orig[a:b] = v
        x[r, toks] = np.where(v > 0, v / batch.rep[a:b], v * batch.rep[a:b]) - batch.sub[a:b]
    for row, mask in zip(batch.mask_rows, batch.masks):
        x[row, ~allowed_tokens(mask, x.shape[1])] = -np.inf
    return x, orig


def token_bitmask(token_ids: Seq[int], vocab: int) -> np.ndarray:
    """Allowed token ids as a packed bitmask row (the layout of structured-output masks)."""
    bits = np.zeros((vocab + 31) // 32 * 32, bool)
    bits[np.asarray(token_ids, np.int64)] = True
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


def allowed_tokens(mask: np.ndarray, vocab: int) -> np.ndarray:
    """A packed bitmask row as booleans [vocab]."""
    return np.unpackbits(np.ascontiguousarray(mask, "<i4").view(np.uint8), bitorder="little")[:vocab].astype(bool)


def kept_tokens(x: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """(z - max z, which tokens the filters keep) for one row of logits x."""
    with np.errstate(invalid="ignore"):  # a row of -inf keeps nothing
        z = x * (np.float32(1.0) / np.float32(temperature))
        z = (z - z.max()).astype(np.float64)
    V = len(z)
    keep = np.ones(V, bool)
    if 0 < top_k < V:
        keep = z >= np.partition(z, -top_k)[-top_k]
    with np.errstate(invalid="ignore"):
        e = np.where(keep, np.exp(z), 0.0)
    if top_p < 1.0:
        asc = np.sort(e)
        suffix = np.concatenate([np.cumsum(asc[::-1])[::-1], [0.0]])  # mass of asc[i:]
        above = suffix[np.searchsorted(asc, e, side="right")]  # mass strictly greater
        keep &= above < top_p * e.sum()
    keep &= (e > 0) & (e >= min_p)
    return z, keep


def draw_scores(x: np.ndarray, batch: SamplingBatch, r: int) -> np.ndarray:
    """Gumbel-max scores of row r's penalised logits x: the draw is their argmax; tokens
    the filters drop score -inf."""
    z, keep = kept_tokens(x, batch.temperature[r], int(batch.top_k[r]), float(batch.top_p[r]),
                          float(batch.min_p[r]))
    u = uniform(batch.seeds[r], batch.counters[r], np.arange(len(z))).astype(np.float64)
    return np.where(keep, z - np.log(-np.log(u)), -np.inf)


def _draw(x: np.ndarray, batch: SamplingBatch, r: int) -> int:
    score = draw_scores(x, batch, r)
    if np.isneginf(score).all():  # a row of -inf or NaN logits: the greedy token, as the kernel
        return int(np.argmax(x))
    return int(np.argmax(score))


# -- the kernels on a device ------------------------------------------------------------------
class KernelDevice(Protocol):
    """What an executor offers for running standalone kernels."""

    def buffer(self, shape: tuple[int, ...], dtype: Any) -> Any: ...
    def upload(self, buf: Any, host: np.ndarray) -> None: ...
    def download(self, buf: Any, count: int) -> np.ndarray: ...
    def load(self, kernel: Any) -> Any: ...
    def launch_kernel(self, kernel: Any, args: Seq[Any], grid: tuple[int, int]) -> None: ...


class KernelSampler:
    """Runs a SamplingBatch through the sampling kernels on `device`. Buffers are
    allocated once for `max_rows` rows and grown only when a batch has more penalty
    entries than any before."""

    def __init__(self, device: KernelDevice, vocab: int, max_rows: int) -> None:
        self.device, self.vocab, self.max_rows = device, vocab, max(1, max_rows)
        self.gather, self.penalties, self.mask, self.sampler, self.top = self.kernel_specs(vocab)
        for kernel in (self.gather, self.penalties, self.mask, self.sampler, self.top):
            device.load(kernel)  # at startup, so the first request does not wait for a compile
        per_row = {"rows": np.int32, "temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
                   "min_p": np.float32, "seeds": np.int32, "counters": np.int32, "out_tokens": np.int32,
                   "picked": np.float32, "logprob_rows": np.int32, "lse": np.float32, "mask_rows": np.int32}
        n = self.max_rows
        self.bufs = {name: device.buffer((n,), dtype) for name, dtype in per_row.items()}
        self.bufs["starts"] = device.buffer((n + 1,), np.int32)
        self.bufs["work"] = device.buffer((n, vocab), np.float32)
        self.bufs["penalised"] = device.buffer((n, vocab), np.float32)
        self.bufs["masks"] = device.buffer((n, (vocab + 31) // 32), np.int32)
        self.bufs["identity"] = device.buffer((n,), np.int32)
        device.upload(self.bufs["identity"], np.arange(n, dtype=np.int32))
        self.bufs["top_ids"] = device.buffer((n, MAX_LOGPROBS), np.int32)
        self.bufs["top_vals"] = device.buffer((n, MAX_LOGPROBS), np.float32)
        self.entries = 0
        self._grow(1024)

    @staticmethod
    def kernel_specs(vocab: int) -> tuple[GatherRows, ApplyPenalties, ApplyTokenMask, SampleRows, TopLogprobs]:
        return (GatherRows(vocab, DType.F32), ApplyPenalties(vocab), ApplyTokenMask(vocab), SampleRows(vocab),
                TopLogprobs(vocab))

    def _grow(self, entries: int) -> None:
        if entries <= self.entries:
            return
        self.entries = max(entries, 2 * self.entries)
        for name, dtype in (("tokens", np.int32), ("rep", np.float32), ("sub", np.float32), ("orig", np.float32)):
            self.bufs[name] = self.device.buffer((self.entries,), dtype)

    def sample(self, logits: Any, batch: SamplingBatch) -> SampleResult:
        """logits: the executor's [rows, vocab] float32 logits buffer."""
        B, E, R, M = len(batch), len(batch.tokens), len(batch.logprob_rows), len(batch.mask_rows)
        if B > self.max_rows:
            raise ValueError(f"{B} rows to sample, more than the {self.max_rows} this sampler holds")
        dev, bufs = self.device, self.bufs
        self._grow(E)
        for name in ("rows", "temperature", "top_k", "top_p", "min_p", "seeds", "counters", "starts"):
            dev.upload(bufs[name], getattr(batch, name))
        if R:
            dev.upload(bufs["logprob_rows"], batch.rows[batch.logprob_rows])
            dev.launch_kernel(self.top, [logits, bufs["logprob_rows"], bufs["lse"], bufs["top_ids"], bufs["top_vals"],
                                         np.int32(batch.k), np.int32(R)], (R, 1))
        source, rows = logits, bufs["rows"]
        if E or M:
            # penalties and masks edit a private copy: the logits stay raw for another draw from them
            dev.launch_kernel(self.gather, [logits, bufs["rows"], bufs["penalised"], np.int32(B)], (B, 1))
            source, rows = bufs["penalised"], bufs["identity"]
        if E:
            for name in ("tokens", "rep", "sub"):
                dev.upload(bufs[name], getattr(batch, name))
            dev.launch_kernel(self.penalties, [source, bufs["starts"], bufs["tokens"], bufs["rep"],
                                               bufs["sub"], bufs["orig"], np.int32(B)], (B, 1))
        if M:
            dev.upload(bufs["mask_rows"], batch.mask_rows)
            dev.upload(bufs["masks"], batch.masks)
            dev.launch_kernel(self.mask, [source, bufs["mask_rows"], bufs["masks"], np.int32(M)], (M, 1))
        dev.launch_kernel(self.sampler, [source, rows, bufs["temperature"], bufs["top_k"], bufs["top_p"],
                                         bufs["min_p"], bufs["seeds"], bufs["counters"], bufs["work"],
                                         bufs["out_tokens"], bufs["picked"], np.int32(B)], (B, 1))
        empty_i, empty_f = np.zeros((0, MAX_LOGPROBS), np.int32), np.zeros((0, MAX_LOGPROBS), np.float32)
        # the picked logits (B floats) come back every step: they show a row of NaN logits
        return SampleResult(
            tokens=dev.download(bufs["out_tokens"], B),
            picked=dev.download(bufs["picked"], B),
            orig=dev.download(bufs["orig"], E) if E else np.zeros(0, np.float32),
            lse=dev.download(bufs["lse"], R) if R else np.zeros(0, np.float32),
            top_ids=dev.download(bufs["top_ids"], R) if R else empty_i,
            top_vals=dev.download(bufs["top_vals"], R) if R else empty_f)
