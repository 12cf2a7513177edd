"""Embeddings (`LLM.embed`, `/v1/embeddings`): vLLM's pooling for a decoder-only model,
the final-normed hidden state of the prompt's last token, L2-normalised."""
from __future__ import annotations

import asyncio
import base64
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from conftest import TINY_SPECS
from helpers import rel_err
from server_helpers import LiveServer, offline_engine_args
from fusec.models.loader import load_model
from fusec.runtime.engine import EngineConfig, LLMEngine
from fusec.runtime.sequence import PoolingParams, SamplingParams

TOL = 1e-4  # f32 activations against torch, as the logits tests
HTTP_TOL = 1e-5  # one engine's unit vectors, batched or cached differently: GEMM rounding only


def hf_last_hidden(path, prompts: list[list[int]]) -> list[np.ndarray]:
    """transformers' final hidden state of each prompt's last token: the base model's
    last_hidden_state, which it returns after the final RMSNorm (what feeds lm_head)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                              experts_implementation="eager").eval()
    with torch.no_grad():
        base = hf.base_model  # .model, or GPT-NeoX's .gpt_neox
        return [base(torch.tensor([ids])).last_hidden_state[0, -1].numpy() for ids in prompts]


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams | PoolingParams]]) -> dict:
    """Submit every request at once, step until all finish; the final outputs by id."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, None, params, prompt_token_ids=ids)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.mark.parametrize("executor", ["fused", "reference"])
@pytest.mark.parametrize("name", [s.name for s in TINY_SPECS])
def test_embeddings_equal_transformers_last_hidden_state(tiny_checkpoints, name, executor):
    path = tiny_checkpoints[name]
    model = load_model(str(path))
    rng = np.random.default_rng(11)
    vocab = model.config.vocab_size
    long = rng.integers(0, vocab, 37).tolist()  # more than a step's 16 tokens: prefilled in 3 chunks
    prompts = {"one": rng.integers(0, vocab, 1).tolist(), "short": rng.integers(0, vocab, 6).tolist(), "long": long}
    gen_prompt = rng.integers(0, vocab, 5).tolist()
    # LongRoPE: transformers turns a forward this short with the short factors, fusec whenever the served
    # context stays within the original one
    rope = model.config.rope_scaling
    limit = {"max_model_len": rope["original_max_position_embeddings"]} if rope["rope_type"] == "longrope" else {}
    engine = LLMEngine(EngineConfig(executor=executor, max_num_batched_tokens=16, block_size=4, num_kv_blocks=64,
                                    **limit), model=model)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = run(engine, {"gen": (gen_prompt, greedy)})["gen"].outputs[0].token_ids

    # embeddings (one of them raw: not normalised) submitted with a generation, whose
    # decode steps then share steps with their chunks
    first = run(engine, {**{k: (ids, PoolingParams()) for k, ids in prompts.items()},
                         "raw": (prompts["short"], PoolingParams(normalize=False)), "gen": (gen_prompt, greedy)})
    assert first["gen"].outputs[0].token_ids == alone
    # prefix-cache hits: the long prompt again (all but its last token cached) and with a new tail
    hits = engine.blocks.cache_hits
    tail = long[:30] + rng.integers(0, vocab, 5).tolist()
    again = run(engine, {"again": (long, PoolingParams()), "tail": (tail, PoolingParams())})
    assert engine.blocks.cache_hits - hits == 36 + 28  # whole blocks of 4, the last token always computed
    engine.close()

    outs = {**first, **again}
    want = dict(zip([*prompts, "tail"], hf_last_hidden(path, [*prompts.values(), tail])))
    want["again"] = want["long"]
    for k, ids in {**prompts, "tail": tail, "again": long}.items():
        got = np.asarray(outs[k].outputs.embedding)
        assert outs[k].prompt_token_ids == ids
        assert rel_err(got, unit(want[k])) < TOL, k
        assert abs(np.linalg.norm(got) - 1) < 1e-5
    assert rel_err(np.asarray(outs["raw"].outputs.embedding), want["short"]) < TOL


def test_embeddings_on_the_cuda_path(tiny_checkpoints, tmp_path):
    """The CUDA executor on its host-memory double, decode graphs captured: one-token
    embeddings joining a decode step make it shaped like a captured graph's, whose gemv
    plan keeps no hidden rows; that step runs the gemm plan instead, and the decodes
    alone still replay graphs."""
    from host_cuda import HostMemoryCuda
    from fusec.fusion.cache import KernelCache

    path = tiny_checkpoints["qwen2"]
    model = load_model(str(path))
    device = HostMemoryCuda(KernelCache(tmp_path))
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=8, num_kv_blocks=64), model=model, device=device)
    assert engine.runner.graph_buckets
    rng = np.random.default_rng(5)
    gen_prompt = rng.integers(0, model.config.vocab_size, 5).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = run(engine, {"gen": (gen_prompt, greedy)})["gen"].outputs[0].token_ids
    engine.add_request("gen", None, greedy, prompt_token_ids=gen_prompt)
    engine.step()  # its prefill: the embeddings arrive while it decodes
    replays = device.replays
    prompts = {k: [int(rng.integers(0, model.config.vocab_size))] for k in "ab"}
    outs = run(engine, {k: (ids, PoolingParams()) for k, ids in prompts.items()})
    assert outs["gen"].outputs[0].token_ids == alone
    assert device.replays - replays == len(alone) - 2  # every decode step but the one shared with the embeddings
    for k, want in zip(prompts, hf_last_hidden(path, list(prompts.values()))):
        assert rel_err(np.asarray(outs[k].outputs.embedding), unit(want)) < TOL, k
    engine.close()
    device.close()


def test_llm_embed(tiny_checkpoints):
    from fusec import LLM
    from fusec.errors import InputError

    path = tiny_checkpoints["llama"]
    llm = LLM(str(path), max_num_batched_tokens=16)
    ids = np.random.default_rng(3).integers(0, 301, 20).tolist()
    outs = llm.embed(prompt_token_ids=[ids, ids[:7]])
    assert [o.prompt_token_ids for o in outs] == [ids, ids[:7]]
    assert [o.request_id for o in outs] == ["0", "1"]
    (want,) = hf_last_hidden(path, [ids])
    assert rel_err(np.asarray(outs[0].outputs.embedding), unit(want)) < TOL
    assert np.abs(np.asarray(outs[1].outputs.embedding) - outs[0].outputs.embedding).max() > 0.01
    with pytest.raises(InputError, match="maximum context length is 128 tokens"):
        llm.embed(prompt_token_ids=[[1] * 129])
    llm.engine.close()


# -- over HTTP, on the default model ---------------------------------------------------------

TEXTS = ["The capital of France is Paris.", "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"]


@pytest.fixture(scope="module")
def smol():
    server = LiveServer("--served-model-name", "smol", "--max-model-len", "512")
    yield server
    code, err = server.stop()
    assert code == 0, err


def post(server: LiveServer, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["id"].startswith("embd-") and body["model"] == "smol"
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "embedding" for d in body["data"])
    return np.array([d["embedding"] for d in body["data"]])


def assert_kv_free(server: LiveServer) -> None:
    """Every KV block is free (the cache-usage gauge, whatever its prefix) and nothing runs."""
    for _ in range(50):
        lines = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
        usage = [float(l.rsplit(" ", 1)[1]) for l in lines if "kv_cache_usage_perc{" in l]
        running = [float(l.rsplit(" ", 1)[1]) for l in lines if "num_requests_running{" in l]
        assert usage and running
        if usage == [0.0] * len(usage) and running == [0.0] * len(running):
            return
        time.sleep(0.1)
    raise AssertionError(f"KV cache usage {usage}, running {running}")


@pytest.mark.slow
def test_http_embeddings_equal_offline_llm(smol):
    from fusec import LLM

    llm = LLM(max_model_len=512, **offline_engine_args())
    want = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    ids = [llm.get_tokenizer().encode(t) for t in TEXTS]
    llm.engine.close()
    assert want.shape == (2, 576) and np.allclose(np.linalg.norm(want, axis=1), 1, atol=1e-5)

    floats = post(smol, model="smol", input=TEXTS)
    got = vectors(floats)
    assert np.abs(got - want).max() < HTTP_TOL
    assert floats.json()["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    assert np.abs(vectors(post(smol, input=TEXTS[0])) - want[:1]).max() < HTTP_TOL  # a string, model omitted
    assert np.abs(vectors(post(smol, input=ids[1])) - want[1:]).max() < HTTP_TOL  # token ids
    assert np.abs(vectors(post(smol, input=ids)) - want).max() < HTTP_TOL  # token-id lists

    b64 = post(smol, input=TEXTS, encoding_format="base64")
    assert b64.status_code == 200
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64.json()["data"]])
    assert decoded.shape == (2, 576) and np.abs(decoded - want).max() < HTTP_TOL

    # the official client asks for base64 unless told, and decodes it itself
    client = openai.OpenAI(base_url=smol.url + "/v1", api_key="none", max_retries=0)
    for fmt in ({}, {"encoding_format": "float"}):
        res = client.embeddings.create(model="smol", input=TEXTS, **fmt)
        assert np.abs(np.array([d.embedding for d in res.data]) - want).max() < HTTP_TOL
        assert res.usage.prompt_tokens == sum(map(len, ids))
    assert_kv_free(smol)


@pytest.mark.slow
@pytest.mark.parametrize("body, status, says", [
    ({"input": []}, 400, "input is empty"),
    ({"input": ""}, 400, "the prompt is empty"),
    ({"input": [5, 49152]}, 400, "token ids must be in [0, 49152)"),
    ({"input": [[5], [-1]]}, 400, "input"),
    ({"input": ["fine", "x " * 600]}, 400, "This model's maximum context length is 512 tokens. However, you "
                                         "requested 601 tokens in the input for embedding generation"),
    ({"input": "x", "dimensions": 8}, 400, 'Model "smol" does not support matryoshka representation'),
    ({"input": "x", "model": "other"}, 404, "The model `other` does not exist."),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "truncate_prompt_tokens": 600}, 400, "truncate_prompt_tokens (600) cannot be greater"),
])
def test_http_embedding_errors(smol, body, status, says):
    r = post(smol, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["code"] == status and error["type"]
    assert_kv_free(smol)  # a request refused after its other inputs were taken aborts them


@pytest.mark.slow
def test_http_truncate_prompt_tokens_keeps_the_last_tokens(smol):
    ids = httpx.post(smol.url + "/tokenize", json={"prompt": TEXTS[1]}, timeout=10).json()["tokens"]
    cut = vectors(post(smol, input=TEXTS[1], truncate_prompt_tokens=5))
    assert np.abs(cut - vectors(post(smol, input=ids[-5:]))).max() < HTTP_TOL
    assert np.abs(cut - vectors(post(smol, input=ids))).max() > 0.01  # fewer tokens, another vector
    assert post(smol, input=TEXTS[1], truncate_prompt_tokens=-1).json()["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.slow
def test_http_generation_interleaved_with_embeddings(smol):
    prompt = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    alone = httpx.post(smol.url + "/v1/completions", json=prompt, timeout=60).json()["choices"][0]["text"]

    async def mixed() -> tuple[str, list[np.ndarray]]:
        async with httpx.AsyncClient(base_url=smol.url, timeout=60) as http:
            completion = asyncio.create_task(http.post("/v1/completions", json=prompt))
            embeddings = [await http.post("/v1/embeddings", json={"input": [t * (i + 1) for t in TEXTS]})
                          for i in range(4)]
            return (await completion).json()["choices"][0]["text"], [vectors(r) for r in embeddings]

    text, embedded = asyncio.run(mixed())
    assert text == alone and len(alone) > 20
    assert all(v.shape == (2, 576) for v in embedded)
    assert_kv_free(smol)
