"""Hostile client input and model faults never give a 500 for the client's input nor
invalid JSON: lone UTF-16 surrogate escapes, invalid UTF-8, NaN literals and booleans
as token ids are 400s; NaN logits fail only the requests they hit, with a clear
error (an error event in a stream), and the server serves the next request."""
from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from fusec.models.loader import load_model
from fusec.runtime.engine import EngineConfig, LLMEngine
from server_helpers import LiveServer, serve_in_process, write_tiny_chat_model

pytestmark = pytest.mark.slow

JSON = {"content-type": "application/json"}
POISONED = 7  # the token whose embedding row is NaN


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    path = write_tiny_chat_model(tmp_path_factory.mktemp("tinychat"), smollm2_path)
    server = LiveServer("--model", str(path), "--served-model-name", "tiny", "--max-model-len", "256")
    yield server
    code, err = server.stop()
    assert code == 0, err


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which JSON does not have."""
    def refuse(name: str):
        raise ValueError(f"{name} in JSON")
    return json.loads(text, parse_constant=refuse)


def assert_error(res: httpx.Response, status: int, words: str = "") -> dict:
    assert res.status_code == status, res.text
    error = strict_json(res.text)["error"]
    assert error["code"] == status and error["type"] and words in error["message"], error
    return error


def assert_still_serving(url: str, body: dict) -> None:
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    res = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert res.status_code == 200, res.text
    strict_json(res.text)


SURROGATE = "a\\ud800b"  # the JSON escape itself: the body carries it as six characters
RAW_BODIES = [
    ("/v1/completions", '{"prompt": "%s", "max_tokens": 2}' % SURROGATE),
    ("/v1/completions", '{"prompt": ["fine", "%s"], "max_tokens": 2}' % SURROGATE),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "%s"}], "max_tokens": 2}' % SURROGATE),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": "%s"}], "max_tokens": 2, "stream": true}' % SURROGATE),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}], "max_tokens": 2}' % SURROGATE),
    ("/tokenize", '{"prompt": "%s"}' % SURROGATE),
    ("/tokenize", '{"messages": [{"role": "user", "content": "%s"}]}' % SURROGATE),
    ("/v1/embeddings", '{"input": "%s"}' % SURROGATE),
    ("/v1/embeddings", '{"input": ["ok", "%s"]}' % SURROGATE),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "hi", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "hi", "stop": ["\\udfff"], "max_tokens": 2}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
                             '"chat_template_kwargs": {"\\ud800": 1}, "max_tokens": 2}'),
]


@pytest.mark.parametrize("path,body", RAW_BODIES)
def test_lone_surrogate_escapes_are_400(tiny, path, body):
    res = httpx.post(tiny.url + path, content=body.encode("ascii"), headers=JSON, timeout=30)
    assert_error(res, 400, "surrogate")
    assert_still_serving(tiny.url, {"prompt": "hello", "max_tokens": 2})


@pytest.mark.parametrize("body", [
    b'{"prompt": "a\xffb", "max_tokens": 2}',  # not UTF-8 at all
    b'{"prompt": "a\xed\xa0\x80b", "max_tokens": 2}',  # a surrogate encoded as UTF-8 bytes
    b'{"prompt": "caf\xe9", "max_tokens": 2}',  # Latin-1
])
def test_invalid_utf8_bodies_are_400(tiny, body):
    res = httpx.post(tiny.url + "/v1/completions", content=body, headers=JSON, timeout=30)
    assert_error(res, 400)
    assert_still_serving(tiny.url, {"prompt": "hello", "max_tokens": 2})


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": NaN}}'),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "temperature": Infinity}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
                             '"chat_template_kwargs": {"x": -Infinity}}'),
])
def test_nan_and_infinity_literals_are_400(tiny, path, body):
    res = httpx.post(tiny.url + path, content=body.encode(), headers=JSON, timeout=30)
    assert_error(res, 400, "NaN and Infinity")
    assert_still_serving(tiny.url, {"prompt": "hello", "max_tokens": 2})


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": [True, False], "max_tokens": 2}),
    ("/v1/completions", {"prompt": [[5, 6], [True]], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop_token_ids": [True]}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "allowed_token_ids": [5, False]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [False]}),
    ("/v1/embeddings", {"input": [True, True]}),
    ("/v1/embeddings", {"input": [[True]]}),
    ("/detokenize", {"tokens": [True]}),
])
def test_booleans_are_not_token_ids(tiny, path, body):
    assert_error(httpx.post(tiny.url + path, json=body, timeout=30), 400)
    assert_still_serving(tiny.url, {"prompt": [5, 6, 7], "max_tokens": 2})


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_a_huge_prompt_does_not_stall_the_server(tiny, path):
    """A 12 MB prompt takes seconds to tokenize (then is refused: over max_model_len);
    meanwhile /health answers at once: tokenization runs in a worker thread and lets go
    of the GIL (tokenizers' plain encode holds it for the whole call: 12 s here)."""
    import threading

    prompt = ("hello world, this is a long prompt. " * 350_000)[:12_000_000]
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(
        httpx.post(tiny.url + path, json={"model": "tiny", "prompt": prompt, "max_tokens": 2}, timeout=300)))
    sender.start()
    time.sleep(0.5)  # the body is sent and its tokenization has begun
    worst = 0.0
    while sender.is_alive():
        start = time.monotonic()
        assert httpx.get(tiny.url + "/health", timeout=60).status_code == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.05)
    sender.join()
    if path == "/tokenize":
        assert answer[0].status_code == 200 and answer[0].json()["count"] > 2_000_000
    else:
        assert_error(answer[0], 400, "maximum context length")
    assert worst < 1.5, f"/health took {worst:.2f} s while a prompt was tokenized"


# -- NaN logits ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tiny_checkpoints):
    """An in-process server whose model has one NaN embedding row (set after loading: a
    corrupt file would be refused at load): prompts with that token get NaN logits, the
    rest are fine (untied embeddings: the LM head stays finite)."""
    model = load_model(str(tiny_checkpoints["llama"]))
    assert not model.config.tie_word_embeddings
    embed = model.weights["embed_tokens"] = np.array(model.weights["embed_tokens"])
    embed[POISONED] = np.nan
    with serve_in_process(LLMEngine(EngineConfig(), model=model)) as url:
        yield url


BAD_PROMPT, GOOD_PROMPT = [5, POISONED, 9], [5, 8, 9]


@pytest.mark.parametrize("extra", [{}, {"logprobs": 3}, {"temperature": 0.8, "seed": 1}, {"n": 2}])
def test_nan_logits_are_a_clear_500_and_only_for_that_request(poisoned, extra):
    body = {"prompt": BAD_PROMPT, "max_tokens": 4, "temperature": 0, **extra}
    assert_error(httpx.post(poisoned + "/v1/completions", json=body, timeout=60), 500, "non-finite values")
    # several prompts in one request: one poisoned fails the whole answer
    both = {**body, "prompt": [GOOD_PROMPT, BAD_PROMPT]}
    assert_error(httpx.post(poisoned + "/v1/completions", json=both, timeout=60), 500, "non-finite values")
    assert_still_serving(poisoned, {**body, "prompt": GOOD_PROMPT})


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2}, {"stream_options": {"include_usage": True}}])
def test_nan_logits_end_a_stream_with_an_error_event(poisoned, extra):
    body = {"prompt": BAD_PROMPT, "max_tokens": 4, "temperature": 0, "stream": True, **extra}
    with httpx.stream("POST", poisoned + "/v1/completions", json=body, timeout=60) as res:
        assert res.status_code == 200
        lines = [line for line in res.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [strict_json(line.removeprefix("data: ")) for line in lines[:-1]]
    error = events[-1]["error"]
    assert error["code"] == 500 and "non-finite values" in error["message"], events
    assert_still_serving(poisoned, {"prompt": GOOD_PROMPT, "max_tokens": 4, "logprobs": 2})


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_nan_hidden_states_fail_an_embedding_request_clearly(poisoned, encoding_format):
    """An embedding of NaNs is a 500 naming the cause, not a 200 of nulls; the others in
    the same request are not returned half, and the server goes on."""
    body = {"model": "tiny", "input": [BAD_PROMPT], "encoding_format": encoding_format}
    assert_error(httpx.post(poisoned + "/v1/embeddings", json=body, timeout=60), 500, "non-finite values")
    both = {**body, "input": [GOOD_PROMPT, BAD_PROMPT]}
    assert_error(httpx.post(poisoned + "/v1/embeddings", json=both, timeout=60), 500, "non-finite values")
    res = httpx.post(poisoned + "/v1/embeddings", json={**body, "input": [GOOD_PROMPT]}, timeout=60)
    assert res.status_code == 200 and len(res.json()["data"]) == 1
