"""Requests and sequences: sampling parameters and per-sequence state."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence as Seq

import numpy as np

from fusec.errors import InputError
from fusec.kernels.random import hash3
from fusec.runtime.structured_output import StructuredOutputsParams

SEED_STREAM = 0x5EED


@dataclass
class SamplingParams:
    """OpenAI sampling parameters plus vLLM's extras, validated on construction."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top logprobs per generated token (0 = just the chosen one)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # a constraint on what may be generated
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: -100 bans, 100 forces)
    allowed_token_ids: list[int] | None = None  # only these may be generated
    best_of: int | None = None  # generate this many, return the n of highest cumulative logprob
    prompt_logprobs: int | None = None  # logprobs of the prompt's tokens (and this many top ones each)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, "n must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1 and np.float32(self.top_p) > 0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be -1, 0 (off) or positive"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must be <= max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (all(-100 <= b <= 100 for b in (self.logit_bias or {}).values()), "logit_bias values must be in [-100, 100]"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids must not be empty"),
            (self.best_of is None or self.best_of >= self.n, "best_of must be greater than or equal to n"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class PoolingParams:
    """An embedding request (vLLM's PoolingParams, task "embed"): the final hidden state
    of the prompt's last token (LAST pooling), L2-normalised unless `normalize` is off.
    Nothing is generated."""

    normalize: bool = True


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first
    rank: int | None = None  # of token_id among all tokens, 1 = the most likely (prompt logprobs)


class Sequence:
    """One generated continuation of a prompt. The KV cache holds `num_computed` of
    its tokens (prompt + output); the block manager keeps the blocks they sit in."""

    _ids = itertools.count()

    def __init__(self, request_id: str, index: int, prompt_ids: Seq[int], params: SamplingParams,
                 arrival: float, max_len: int) -> None:
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        # one list the model reads, grown in place by append_token; the outputs kept alongside
        self.tokens: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(self.tokens)
        self._output_ids: list[int] = []
        self.params = params
        self.arrival = arrival
        self.max_len = max_len  # prompt + output may not pass this
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.num_cached = 0  # prompt tokens found in the prefix cache at admission
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        self.logprobs: list[Logprob] = []
        self.matcher: Any = None  # an llguidance matcher walking the output, under a structured-output constraint
        self.allowed_mask: np.ndarray | None = None  # allowed_token_ids as a packed bitmask row
        self.pooling: PoolingParams | None = None  # an embedding request's: it ends after its prompt, unsampled
        # the sampler's uniforms are hash(seed, tokens generated so far, token id): a
        # seeded request draws the same numbers in any batch, its n completions differ
        self.seed = (int(hash3(params.seed, index, SEED_STREAM)) if params.seed is not None
                     else int(np.random.default_rng().integers(2 ** 32)))
        self.first_token_time: float | None = None
        self.token_times: list[float] = []

    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens[:self.num_prompt_tokens]

    @property
    def scores_prompt(self) -> bool:
        """Its next chunk needs the logits of every prompt position (prompt_logprobs)."""
        return self.index == 0 and self.params.prompt_logprobs is not None and self.num_computed < self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self._output_ids

    @output_ids.setter
    def output_ids(self, ids: Seq[int]) -> None:
        self._output_ids = list(ids)
        self.tokens[self.num_prompt_tokens:] = self._output_ids

    def append_token(self, token: int) -> None:
        self.tokens.append(token)
        self._output_ids.append(token)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed
