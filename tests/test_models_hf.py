"""Logits of tiny random Llama / Mistral / Qwen2 checkpoints match transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_SPECS, make_hf_model
from helpers import SequenceChunk, poisoned_runner, rel_err, scattered_tables
from fusec.fusion.dtypes import DType
from fusec.models.loader import load_model

BLOCK = 4
TOL = 1e-4


def hf_logits(path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("name", [s.name for s in TINY_SPECS])
def test_prefill_and_decode_match_transformers(tiny_checkpoints, name):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoints[name]
    model = load_model(str(path))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                              experts_implementation="eager").eval()
    rng = np.random.default_rng(7)
    vocab = model.config.vocab_size
    # Two sequences in one batch, scattered blocks, so batching and paging are both exercised.
    prompts = [rng.integers(0, vocab, 11).tolist(), rng.integers(0, vocab, 6).tolist()]
    follow = [rng.integers(0, vocab, 8).tolist(), rng.integers(0, vocab, 8).tolist()]
    tables = scattered_tables(16, [-(-(len(p) + 8) // BLOCK) for p in prompts], seed=3)
    runner = poisoned_runner(model, 16, BLOCK)
    chunks = [SequenceChunk(p, 0, t, all_logits=True) for p, t in zip(prompts, tables)]
    logits = runner.execute(chunks)

    with torch.no_grad():
        full = [hf(torch.tensor([p + f])).logits[0].numpy() for p, f in zip(prompts, follow)]
    assert rel_err(logits[:11], full[0][:11]) < TOL
    assert rel_err(logits[11:], full[1][:6]) < TOL

    for step in range(8):
        for c, p, f in zip(chunks, prompts, follow):
            c.start = len(p) + step
            c.token_ids = [f[step]]
        logits = runner.execute(chunks)
        for row, (p, want) in enumerate(zip(prompts, full)):
            assert rel_err(logits[row], want[len(p) + step]) < TOL, f"decode step {step}, seq {row}"


def test_chunked_prefill_equals_one_shot(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama"]))
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 13).tolist()
    table = scattered_tables(8, [4], seed=5)[0]
    whole = poisoned_runner(model, 8, BLOCK).execute([SequenceChunk(ids, 0, table, all_logits=True)])
    runner = poisoned_runner(model, 8, BLOCK)
    parts = [runner.execute([SequenceChunk(ids[a:b], a, table, all_logits=True)]) for a, b in [(0, 5), (5, 9), (9, 13)]]
    assert rel_err(np.concatenate(parts), whole) < 1e-5


def test_bf16_checkpoint_loads_bit_exact(tiny_checkpoints, tmp_path):
    spec = next(s for s in TINY_SPECS if s.name == "qwen2")
    hf = make_hf_model(spec).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(str(tmp_path), dtype="bf16")
    assert model.dtype is DType.BF16
    want = hf.model.layers[1].self_attn.k_proj.weight.detach().view(torch.int16).numpy().view(np.uint16)
    q, kv = model.config.q_size, model.config.kv_size
    np.testing.assert_array_equal(model.weights["layers.1.qkv"][q:q + kv], want)
    ids = [5, 17, 200, 3, 99]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    got = poisoned_runner(model, 4, BLOCK).execute([SequenceChunk(ids, 0, [0, 1], all_logits=True)])
    assert rel_err(got, ref) < 5e-2  # bf16 activations round differently in torch


def test_sharded_checkpoint_equals_single_file(tiny_checkpoints, tmp_path):
    spec = next(s for s in TINY_SPECS if s.name == "mistral")
    make_hf_model(spec).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    a = load_model(str(tmp_path))
    b = load_model(str(tiny_checkpoints["mistral"]))
    for name, w in b.weights.items():
        np.testing.assert_array_equal(a.weights[name], w, err_msg=name)


def test_dummy_weights_are_seeded(tiny_checkpoints):
    path = str(tiny_checkpoints["llama"])
    a = load_model(path, load_format="dummy", seed=3)
    b = load_model(path, load_format="dummy", seed=3)
    c = load_model(path, load_format="dummy", seed=4)
    real = load_model(path)
    assert a.weights.keys() == real.weights.keys()
    for name in a.weights:
        assert a.weights[name].shape == real.weights[name].shape
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
    assert not np.array_equal(a.weights["layers.0.qkv"], c.weights["layers.0.qkv"])
    assert a.weights["layers.0.qkv"].std() > 0.01
