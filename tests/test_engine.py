"""The runtime: continuous batching equals running alone equals the reference;
preemption, prefix caching and copy-on-write change no output; sampling controls."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import run_requests
from fusec.errors import InputError
from fusec.models.loader import load_model
from fusec.runtime.engine import EngineConfig, LLMEngine
from fusec.runtime.llm import LLM
from fusec.runtime.sequence import PoolingParams, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return {name: load_model(str(path)) for name, path in tiny_checkpoints.items()}


run = run_requests


def mixed_prompts(vocab: int, n: int = 16, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(1, 40))).tolist() for _ in range(n)]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_batch_equals_alone_equals_reference(tiny, name):
    model = tiny[name]
    prompts = mixed_prompts(model.config.vocab_size)
    batched = run(LLMEngine(EngineConfig(max_num_batched_tokens=64), model=model), prompts, GREEDY)
    reference = run(LLMEngine(EngineConfig(executor="reference"), model=model), prompts, GREEDY)
    for i, p in enumerate(prompts):
        (alone,) = run(LLMEngine(EngineConfig(), model=model), [p], GREEDY)
        assert batched[i].outputs[0].token_ids == alone.outputs[0].token_ids == reference[i].outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in batched}) > 8


@pytest.mark.slow
def test_smollm2_batch_of_16_equals_alone_and_reference(smollm2_path):
    model = load_model(str(smollm2_path))
    tok = model.tokenizer
    texts = ["Hi", "What is 2+2?", "Name three colors.", "The capital of Italy is", "def add(a, b):",
             "Once upon a time, in a land far away, there lived a", "1, 1, 2, 3, 5, 8,", "Translate 'cat' to French.",
             "Why is the sky blue?", "A haiku about autumn:", "import numpy as np\n", "The opposite of hot is",
             "List the planets of the solar system in order from the sun.", "Q: What is water made of?\nA:",
             "Tell me a joke.", "Summer, winter, spring and"]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) if i % 2 else tok.encode(t) for i, t in enumerate(texts)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    batched = run(LLMEngine(EngineConfig(max_num_batched_tokens=256), model=model), prompts, params)
    reference = run(LLMEngine(EngineConfig(executor="reference", max_model_len=512, kv_cache_gb=0.25), model=model),
                    prompts, params)
    solo = LLMEngine(EngineConfig(enable_prefix_caching=False), model=model)
    for i, p in enumerate(prompts):
        (alone,) = run(solo, [p], params)
        assert alone.outputs[0].token_ids == batched[i].outputs[0].token_ids, texts[i]
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in reference]


def test_preemption_keeps_outputs(tiny):
    model = tiny["llama"]
    prompts = mixed_prompts(model.config.vocab_size, 10, seed=2)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    roomy = run(LLMEngine(EngineConfig(), model=model), prompts, params)
    # 17 blocks of 4 tokens: each sequence fits alone (<= 70 tokens), all of them never do
    tight = LLMEngine(EngineConfig(block_size=4, num_kv_blocks=18, max_model_len=72), model=model)
    squeezed = run(tight, prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in squeezed] == [o.outputs[0].token_ids for o in roomy]


def test_prefix_cache_computes_only_new_tokens(tiny):
    model = tiny["qwen2"]
    rng = np.random.default_rng(4)
    prefix = rng.integers(0, model.config.vocab_size, 64).tolist()
    first, second = prefix + [5, 6, 7], prefix + [9, 10]
    engine = LLMEngine(EngineConfig(), model=model)
    run(engine, [first], GREEDY)
    before = engine.stats.computed_tokens
    (out,) = run(engine, [second], GREEDY)
    computed = engine.stats.computed_tokens - before
    # 64 shared tokens = 4 cached blocks of 16: only the 2 new prompt tokens + 11 decode steps run
    assert out.metrics.num_cached_tokens == 64
    assert computed == 2 + (GREEDY.max_tokens - 1)
    (fresh,) = run(LLMEngine(EngineConfig(enable_prefix_caching=False), model=model), [second], GREEDY)
    assert out.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_across_batches(tiny):
    model = tiny["mistral"]
    prompts = mixed_prompts(model.config.vocab_size, 6, seed=9)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=15, ignore_eos=True)
    alone = run(LLMEngine(EngineConfig(), model=model), [prompts[0]], seeded)
    mixed = run(LLMEngine(EngineConfig(), model=model), prompts,
                [seeded] + [SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True)] * 5)
    again = run(LLMEngine(EngineConfig(), model=model), [prompts[0]], seeded)
    assert alone[0].outputs[0].token_ids == mixed[0].outputs[0].token_ids == again[0].outputs[0].token_ids
    other_seed = run(LLMEngine(EngineConfig(), model=model), [prompts[0]],
                     SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=15, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone[0].outputs[0].token_ids


def test_n_completions_share_the_prompt(tiny):
    model = tiny["llama"]
    engine = LLMEngine(EngineConfig(), model=model)
    prompt = np.random.default_rng(3).integers(0, model.config.vocab_size, 37).tolist()
    (out,) = run(engine, [prompt], SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    assert engine.stats.computed_tokens == 37 + 4 * 9  # the prompt ran once
    # greedy n=2: both copies continue identically through copy-on-write blocks
    (g,) = run(engine, [prompt], SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True))
    (single,) = run(LLMEngine(EngineConfig(enable_prefix_caching=False), model=model), [prompt],
                    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert g.outputs[0].token_ids == g.outputs[1].token_ids == single.outputs[0].token_ids


def test_forks_stay_within_max_num_seqs(tiny):
    """n completions count against max_num_seqs before they fork: never more sequences
    in a step than the cap the device's buffers and graphs were sized for."""
    engine = LLMEngine(EngineConfig(max_num_seqs=3, max_model_len=64), model=tiny["llama"])
    params = SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=6, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", None, params, prompt_token_ids=[5 + i, 6, 7])
    done = 0
    while engine.has_unfinished_requests():
        done += sum(o.finished for o in engine.step())
        assert len(engine.scheduler.running) <= 3
    assert done == 3 and engine.blocks.all_free()
    with pytest.raises(InputError, match="more than --max-num-seqs 3"):
        engine.add_request("big", None, SamplingParams(n=4), prompt_token_ids=[1, 2])


@pytest.mark.slow
def test_stop_strings_cut_exactly(smollm2_path):
    llm = LLM(str(smollm2_path))
    plain = llm.generate(["1, 2, 3, 4, 5,"], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert " 7" in plain.text
    cut = plain.text.index(" 7")
    (out,) = llm.generate(["1, 2, 3, 4, 5,"], SamplingParams(temperature=0, max_tokens=20, stop=[" 7", "zzz"]))
    c = out.outputs[0]
    assert c.text == plain.text[:cut] and c.finish_reason == "stop" and c.stop_reason == " 7"
    (kept,) = llm.generate(["1, 2, 3, 4, 5,"], SamplingParams(temperature=0, max_tokens=20, stop=[" 7"],
                                                                include_stop_str_in_output=True))
    assert kept.outputs[0].text == plain.text[:cut + 2]
    # streaming never shows a stop string, even one split across tokens
    engine = llm.engine
    engine.add_request("s", "1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, stop=[" 7"]))
    seen = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            seen.append(o.outputs[0].text)
    assert all(" 7" not in t and plain.text.startswith(t) for t in seen)
    assert seen[-1] == plain.text[:cut]


def test_logprobs_and_penalties(tiny):
    model = tiny["qwen2"]
    engine = LLMEngine(EngineConfig(), model=model)
    prompt = [3, 14, 15, 92, 65]
    (out,) = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert lp.token_id == tok and lp.top[0][0] == tok  # greedy: the chosen token is the most likely
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))
    (rep,) = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=12, repetition_penalty=5.0,
                                                  ignore_eos=True))
    assert len(set(rep.outputs[0].token_ids)) == 12  # a strong repetition penalty repeats nothing
    (pres,) = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=12, presence_penalty=2.0,
                                                   frequency_penalty=2.0, ignore_eos=True))
    assert len(set(pres.outputs[0].token_ids)) > len(set(c.token_ids)) - 1


def test_bad_requests_are_rejected(tiny):
    engine = LLMEngine(EngineConfig(max_model_len=64), model=tiny["llama"])
    with pytest.raises(InputError, match="maximum context length is 64"):
        engine.add_request("a", None, SamplingParams(max_tokens=10), prompt_token_ids=list(range(60)))
    with pytest.raises(InputError, match="empty"):
        engine.add_request("b", None, SamplingParams(), prompt_token_ids=[])
    with pytest.raises(InputError, match="token ids"):
        engine.add_request("c", None, SamplingParams(), prompt_token_ids=[10 ** 6])
    for bad in (dict(temperature=-1), dict(top_p=0), dict(n=0), dict(max_tokens=0), dict(logprobs=50)):
        with pytest.raises(InputError):
            SamplingParams(**bad)


def test_abort_frees_blocks(tiny):
    engine = LLMEngine(EngineConfig(), model=tiny["llama"])
    engine.add_request("x", None, SamplingParams(n=3, max_tokens=50, ignore_eos=True), prompt_token_ids=list(range(40)))
    engine.step()
    (last,) = engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    final = engine.abort_request("x")  # what each completion has so far, ended by the abort
    assert engine.blocks.all_free() and not engine.has_unfinished_requests()
    assert final.finished and [c.finish_reason for c in final.outputs] == ["abort"] * 3
    assert [c.token_ids for c in final.outputs] == [c.token_ids for c in last.outputs] and last.outputs[0].token_ids
    assert engine.abort_request("x") is None  # gone


def test_abort_of_an_embedding_request_has_no_output(tiny):
    engine = LLMEngine(EngineConfig(), model=tiny["llama"])
    engine.add_request("e", None, PoolingParams(), prompt_token_ids=list(range(40)))
    assert engine.abort_request("e") is None
    assert engine.blocks.all_free() and not engine.has_unfinished_requests()


def test_best_of_returns_the_n_most_likely_of_best_of(tiny):
    """best_of=6, n=2: the two of six seeded samples with the highest cumulative logprob
    (the same six that n=6 draws), renumbered, without logprobs unless asked."""
    engine = LLMEngine(EngineConfig(), model=tiny["llama"])
    prompt = [5, 17, 99, 3, 42]
    sampled = dict(temperature=1.0, seed=4, max_tokens=8, ignore_eos=True)
    (six,) = run(engine, [prompt], SamplingParams(n=6, logprobs=0, **sampled))
    ranked = sorted(six.outputs, key=lambda o: -o.cumulative_logprob)
    (best,) = run(engine, [prompt], SamplingParams(n=2, best_of=6, **sampled))
    assert [o.index for o in best.outputs] == [0, 1]
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked[:2]]
    assert all(o.logprobs is None and o.cumulative_logprob is None for o in best.outputs)
    (scored,) = run(engine, [prompt], SamplingParams(n=2, best_of=6, logprobs=1, **sampled))
    assert [o.cumulative_logprob for o in scored.outputs] == pytest.approx([o.cumulative_logprob for o in ranked[:2]])
    with pytest.raises(InputError, match="best_of"):
        SamplingParams(n=3, best_of=2)


def test_prompt_logprobs_match_transformers(tiny_checkpoints, tiny):
    """prompt_logprobs of a 120-token prompt (two steps of scored rows), submitted
    after the same prompt filled the prefix cache and beside another request, equal the
    log-softmax of transformers' logits: each token's logprob and rank, and the top 3."""
    import torch
    import transformers

    model = tiny["llama"]
    prompt = np.random.default_rng(3).integers(0, model.config.vocab_size, 120).tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), dim=-1).numpy()
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=96), model=model)
    run(engine, [prompt], SamplingParams(max_tokens=1))  # the prompt is now in the prefix cache
    outs = run(engine, [prompt, prompt[:40]], [SamplingParams(max_tokens=2, prompt_logprobs=3),
                                                SamplingParams(max_tokens=2)])
    got = outs[0].prompt_logprobs
    assert outs[0].prompt_token_ids == prompt and outs[1].prompt_logprobs is None
    assert len(got) == len(prompt) and got[0] is None
    for j in range(1, len(prompt)):
        row, lp = want[j - 1], got[j]
        assert lp.token_id == prompt[j]
        assert lp.logprob == pytest.approx(row[prompt[j]], abs=2e-3)
        assert lp.rank == 1 + int((row > row[prompt[j]]).sum())
        assert [t for t, _ in lp.top] == np.argsort(-row)[:3].tolist()
