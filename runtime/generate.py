"""Offline generation on the reference path: prefill all prompts together, then decode
them as one batch, token by token, through the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fusec.errors import InputError
from fusec.models.loader import Model
from fusec.runtime.block_manager import BlockManager
from fusec.runtime.model_runner import ModelRunner, SequenceChunk


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None
    ignore_eos: bool = False


def context_limit(model: Model, max_model_len: int | None) -> int:
    limit = model.config.max_position_embeddings
    return min(limit, max_model_len) if max_model_len else limit


def validate_prompts(model: Model, prompts: Sequence[Sequence[int]], max_model_len: int | None) -> int:
    limit = context_limit(model, max_model_len)
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompt {i + 1} is empty")
        if len(p) >= limit:
            raise InputError(f"prompt {i + 1} has {len(p)} tokens; the context holds {limit} "
                             f"(prompt plus at least one generated token)")
        if max(p) >= model.config.vocab_size or min(p) < 0:
            raise InputError(f"prompt {i + 1} has token ids outside the vocabulary (0..{model.config.vocab_size - 1})")
    return limit


def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(model: Model, prompts: Sequence[Sequence[int]], params: GenerationParams,
             max_model_len: int | None = None, block_size: int = 16, fused: bool = False) -> list[list[int]]:
    """Generated token ids for each prompt (stops at EOS unless ignore_eos). fused=True
    runs the compiled plans on the host instead of the reference interpreter."""
    if params.temperature < 0:
        raise InputError("temperature must be >= 0")
    if params.max_tokens < 1:
        raise InputError("max_tokens must be >= 1")
    limit = validate_prompts(model, prompts, max_model_len)
    budgets = [min(params.max_tokens, limit - len(p)) for p in prompts]
    blocks = BlockManager(sum(-(-(len(p) + b) // block_size) for p, b in zip(prompts, budgets)), block_size)
    runner = ModelRunner(model, blocks.num_blocks, block_size, fused=fused)
    eos = set(model.config.eos_token_ids)
    if model.tokenizer and model.tokenizer.eos_token_id is not None:
        eos.add(model.tokenizer.eos_token_id)
    rngs = [np.random.default_rng(None if params.seed is None else params.seed + i) for i in range(len(prompts))]
    outputs: list[list[int]] = [[] for _ in prompts]
    chunks = []
    for p in prompts:
        chunk = SequenceChunk(list(p), 0)
        blocks.grow(chunk.block_table, len(p))
        chunks.append(chunk)
    active = list(range(len(prompts)))
    while active:
        logits = runner.execute([chunks[i] for i in active])
        still = []
        for row, i in enumerate(active):
            token = _sample(logits[row], params.temperature, rngs[i])
            outputs[i].append(token)
            done = len(outputs[i]) >= budgets[i] or (token in eos and not params.ignore_eos)
            c = chunks[i]
            if done:
                blocks.free(c.block_table)
                continue
            c.start += len(c.token_ids)
            c.token_ids = [token]
            blocks.grow(c.block_table, c.start + 1)
            still.append(i)
        active = still
    return outputs
