"""`fusec serve` through the official openai client, on loopback."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from server_helpers import LiveServer, offline_engine_args, write_tiny_chat_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    server = LiveServer("--served-model-name", "smol", "--max-model-len", "2048")
    yield server
    code, err = server.stop()
    assert code == 0, err
    assert "fusec server stopped" in err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    path = write_tiny_chat_model(tmp_path_factory.mktemp("tinychat"), smollm2_path)
    server = LiveServer("--model", str(path), "--served-model-name", "tiny", "--max-model-len", "256",
                        "--max-num-seqs", "64")
    yield server
    code, err = server.stop()
    assert code == 0, err


def client(server: LiveServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def test_models_health_version(smol):
    models = client(smol).models.list()
    assert [m.id for m in models.data] == ["smol"]
    assert httpx.get(smol.url + "/health").status_code == 200
    assert httpx.get(smol.url + "/version").json()["version"]


def test_http_greedy_equals_offline_llm(smol):
    from fusec import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3,"]
    llm = LLM(max_model_len=2048, **offline_engine_args())
    want = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))]
    llm.engine.close()
    got = client(smol).completions.create(model="smol", prompt=prompts, max_tokens=16, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
    assert got.usage.completion_tokens == sum(len(c.text) > 0 and 16 or 0 for c in got.choices) or got.usage.completion_tokens > 0


def test_chat_answers_and_streams_the_same(smol):
    c = client(smol)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = c.chat.completions.create(model="smol", messages=msgs, max_tokens=24, temperature=0)
    assert "Paris" in full.choices[0].message.content and full.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="smol", messages=msgs, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_stream_include_usage(smol):
    chunks = list(client(smol).completions.create(model="smol", prompt="Once upon a time", max_tokens=10,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_n_stop_logprobs_echo(smol):
    c = client(smol)
    two = c.completions.create(model="smol", prompt="My favourite fruit is", n=2, max_tokens=8, temperature=1.0,
                               seed=3)
    assert sorted(ch.index for ch in two.choices) == [0, 1]
    plain = c.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0).choices[0].text
    cut = c.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stop=[" 7"])
    assert cut.choices[0].text == plain[:plain.index(" 7")] and cut.choices[0].finish_reason == "stop"
    lp = c.completions.create(model="smol", prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    assert len(lp.choices[0].logprobs.tokens) == 4 and all(len(t) == 3 for t in lp.choices[0].logprobs.top_logprobs)
    chat = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    echo = c.completions.create(model="smol", prompt="Hello there", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hello there")


def test_best_of_and_prompt_logprobs(smol):
    """best_of: the n best of best_of samples by cumulative logprob; prompt_logprobs in
    vLLM's shape on completions (per choice) and chat (per response)."""
    c = client(smol)
    prompt = "The capital of France is"
    sampled = dict(model="smol", prompt=prompt, max_tokens=6, temperature=1.0, seed=5)
    six = c.completions.create(n=6, logprobs=0, **sampled)
    totals = sorted((sum(ch.logprobs.token_logprobs), ch.text) for ch in six.choices)
    best = c.completions.create(n=2, best_of=6, **sampled)
    assert [ch.text for ch in sorted(best.choices, key=lambda ch: ch.index)] == [t for _, t in totals[::-1][:2]]
    assert all(ch.logprobs is None for ch in best.choices)
    ids = httpx.post(smol.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    out = c.completions.create(model="smol", prompt=prompt, max_tokens=1, temperature=0,
                               extra_body={"prompt_logprobs": 2}).model_dump()
    scored = out["choices"][0]["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    for token, entry in zip(ids[1:], scored[1:]):
        mine = entry[str(token)] if str(token) in entry else entry[token]
        assert mine["logprob"] <= 0 and mine["rank"] >= 1 and mine["decoded_token"]
        assert 2 <= len(entry) <= 3 and sorted(e["rank"] for e in entry.values())[:2] == [1, 2]
    chat = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                     extra_body={"prompt_logprobs": 0}).model_dump()
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    for extra in ({"best_of": 3, "n": 4}, {"best_of": 3, "stream": True}, {"prompt_logprobs": 1, "stream": True},
                  {"prompt_logprobs": 21}):
        r = httpx.post(smol.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra})
        assert r.status_code == 400 and r.json()["error"]["message"], extra


BAD = [
    ("/v1/completions", "{not json", 400),
    ("/v1/completions", [1, 2], 400),
    ("/v1/completions", {}, 400),
    ("/v1/completions", {"prompt": 5}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": 7}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -9}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, 400),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400),
    ("/v1/completions", {"prompt": [10 ** 7]}, 400),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400),
    ("/v1/completions", {"prompt": "x", "min_tokens": 50, "max_tokens": 5}, 400),
    ("/v1/completions", {"prompt": "x" * 20000, "max_tokens": 8}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "maybe"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404),
    ("/tokenize", {"model": "tiny"}, 400),
    ("/detokenize", {"tokens": [-1]}, 400),
    ("/detokenize", {"tokens": [10 ** 8]}, 400),
]


def test_bad_input_table(tiny):
    assert len(BAD) >= 25
    with httpx.Client(base_url=tiny.url, timeout=60) as http:
        for path, body, status in BAD:
            raw = body if isinstance(body, str) else json.dumps(body)
            res = http.post(path, content=raw, headers={"content-type": "application/json"})
            assert res.status_code == status, (path, body, res.status_code, res.text)
            err = res.json()["error"]
            assert err["message"] and err["code"] == status and err["type"], (path, body, err)
        ok = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 1
    assert tiny.metrics()["vllm:num_requests_running"] == 0


def test_api_key(tiny_checkpoints):
    server = LiveServer("--model", str(tiny_checkpoints["llama"]), "--api-key", "sekret")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = {"prompt": [1, 2, 3], "max_tokens": 2}
            assert http.post("/v1/completions", json=body).status_code == 401
            bad = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
            assert bad.status_code == 401 and bad.json()["error"]["code"] == 401
            assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200
            assert http.get("/health").status_code == 200
    finally:
        server.stop()


def test_256_concurrent_streams(tiny):
    async def one(c: openai.AsyncOpenAI, i: int) -> int:
        stream = await c.completions.create(model="tiny", prompt=f"request {i}: hello", max_tokens=6,
                                            temperature=0.7, seed=i, stream=True,
                                            extra_body={"ignore_eos": True})
        tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                tokens += 1
        return tokens

    async def main():
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with openai.AsyncOpenAI(base_url=tiny.url + "/v1", api_key="x", max_retries=0, timeout=300,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=300)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(256)), return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert results == [1] * 256
    m = tiny.metrics()
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0


def test_disconnecting_clients_leave_nothing_behind(tiny):
    async def leave(i: int) -> None:
        async with httpx.AsyncClient(base_url=tiny.url, timeout=60) as http:
            body = {"prompt": f"client {i}", "max_tokens": 200, "stream": True, "ignore_eos": True}
            async with http.stream("POST", "/v1/completions", json=body) as res:
                assert res.status_code == 200
                async for line in res.aiter_lines():
                    if line.startswith("data: "):
                        break  # one chunk, then hang up

    async def main():
        await asyncio.gather(*(leave(i) for i in range(50)))

    asyncio.run(main())
    for _ in range(100):
        m = tiny.metrics()
        if m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0


def test_schemathesis_finds_no_5xx(tiny, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    st = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    res = subprocess.run([st, "run", tiny.url + "/openapi.json", "--checks", "not_a_server_error",
                          "--max-examples", "25", "--request-timeout", "60", "--suppress-health-check", "all",
                          "--seed", "1", "--exclude-path", "/metrics"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    m = tiny.metrics()
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0


def test_sigterm_drains_in_flight_requests(tiny_checkpoints):
    import signal
    import threading

    server = LiveServer("--model", str(tiny_checkpoints["qwen2"]), "--log-level", "warning")
    lines: list[str] = []

    def stream() -> None:
        body = {"prompt": [5, 6, 7], "max_tokens": 100, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as res:
            lines.extend(line for line in res.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    for _ in range(200):  # wait until the request is generating
        if server.metrics().get("vllm:generation_tokens_total", 0) > 0:
            break
        threading.Event().wait(0.02)
    server.proc.send_signal(signal.SIGTERM)
    reader.join(timeout=120)
    code, err = server.stop()
    assert code == 0, err
    assert lines[-1] == "data: [DONE]"
    finish = json.loads(lines[-2][6:])["choices"][0]
    assert finish["finish_reason"] == "length"  # the whole answer, not cut off by the shutdown
