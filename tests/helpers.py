"""Small assertions and builders shared by tests."""
from __future__ import annotations

import numpy as np

from fusec.models.loader import Model
from fusec.runtime.model_runner import ModelRunner, SequenceChunk


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    return float(np.abs(got - want).max() / np.abs(want).max())


def scattered_tables(num_blocks: int, per_seq: list[int], seed: int = 0) -> list[list[int]]:
    """Disjoint, shuffled block tables, so paging bugs cannot hide behind contiguity."""
    ids = np.random.default_rng(seed).permutation(num_blocks)
    out, at = [], 0
    for n in per_seq:
        out.append([int(b) for b in ids[at:at + n]])
        at += n
    return out


def poisoned_runner(model: Model, num_blocks: int, block_size: int) -> ModelRunner:
    """A runner whose KV cache starts as NaN: reading an unwritten slot poisons the output."""
    from fusec.runtime.config import EngineConfig

    config = EngineConfig(num_kv_blocks=num_blocks, block_size=block_size)
    max_model_len = min(model.config.max_position_embeddings, num_blocks * block_size)
    runner = ModelRunner(model, config, None, max_model_len=max_model_len)
    for cache in runner.executor.kv.values():
        cache.fill(np.nan)
    return runner


__all__ = ["rel_err", "scattered_tables", "poisoned_runner", "SequenceChunk", "engine_generate", "run_requests"]


def run_requests(engine, prompts: list[list[int]], params) -> list:
    """Submit every prompt at once (one SamplingParams, or one per prompt), step the
    engine until all finish, and return the final RequestOutputs in prompt order."""
    from fusec.runtime.sequence import SamplingParams

    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", None, params if isinstance(params, SamplingParams) else params[i],
                           prompt_token_ids=ids)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(prompts))]


def engine_generate(model: Model, prompts: list[list[int]], params, executor: str = "reference",
                    **config) -> list[list[int]]:
    """Token ids of each prompt's first completion, all prompts submitted together. The
    fused plans keep float activations unless told otherwise (int8 activations change the
    arithmetic: tests/test_int8_activations.py holds them to their own bar)."""
    from fusec.runtime.engine import EngineConfig, LLMEngine

    config.setdefault("int8_activations", False)
    engine = LLMEngine(EngineConfig(executor=executor, **config), model=model)
    outputs = run_requests(engine, prompts, params)
    assert engine.blocks.all_free()
    engine.close()
    return [out.outputs[0].token_ids for out in outputs]
