"""The default model from its GGUF: greedy tokens identical to transformers loading the
same file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import SequenceChunk, engine_generate, poisoned_runner, rel_err
from fusec.models.loader import load_model
from fusec.runtime.sequence import SamplingParams

pytestmark = pytest.mark.slow

PLAIN = ["The quick brown fox", "def fibonacci(n):\n    ", "Paris is the capital of"]
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
STEPS = 32


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return load_model(str(smollm2_path))


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_path.name)
    tok = AutoTokenizer.from_pretrained(smollm2_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32, **kw).eval()
    return tok, model


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    out, past, inp = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            res = model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            inp = torch.tensor([[nxt]])
    return out


def prompts(tok):
    plain = [tok(p)["input_ids"] for p in PLAIN]
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for p in CHAT]
    return plain + chat


def test_prefill_logits_match(ours, hf):
    tok, model = hf
    ids = prompts(tok)[3]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = poisoned_runner(ours, 8, 16).execute([SequenceChunk(ids, 0, list(range(-(-len(ids) // 16))),
                                                              all_logits=True)])
    assert rel_err(got, want) < 1e-4


def test_greedy_tokens_identical(ours, hf):
    tok, model = hf
    batch = prompts(tok)
    for ids in batch:
        assert ours.tokenizer.encode(tok.decode(ids, skip_special_tokens=False), add_special_tokens=False) == ids
    got = engine_generate(ours, batch, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))
    for ids, out in zip(batch, got):
        assert out == hf_greedy(model, ids, STEPS), tok.decode(ids)


def test_chat_answer_names_paris(ours):
    tok = ours.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    (out,) = engine_generate(ours, [ids], SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in tok.decode(out)
    assert np.isfinite(out).all()
