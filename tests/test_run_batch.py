"""`fusec run-batch`: an OpenAI batch file through the server's app, answered in vLLM's
batch output format, in input order, with the offline engine's greedy text."""
from __future__ import annotations

import json
import random
import subprocess

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from fusec.errors import InputError
from fusec.runtime.server.batch import parse_batch
from server_helpers import FUSEC, SERVE_ARGS, offline_engine_args

SUBJECTS = ["the ocean", "a red fox", "Paris", "prime numbers", "the moon", "a violin", "winter", "bread",
            "a lighthouse", "volcanoes", "honey bees", "chess", "the desert", "a clock", "rain", "glaciers"]


def _requests(rng: random.Random) -> list[dict]:
    """20 greedy lines, chat and completion shuffled together, then three the server refuses."""
    lines = []
    for i in range(20):
        subject = rng.choice(SUBJECTS)
        if rng.random() < 0.5:
            url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell me about {subject}."}]}
        else:
            url, body = "/v1/completions", {"prompt": f"A short story about {subject}:"}
        body.update(model="smol", max_tokens=rng.randint(4, 8), temperature=0)
        lines.append({"custom_id": f"req-{i}-{rng.getrandbits(32):08x}", "method": "POST", "url": url, "body": body})
    lines.append({"custom_id": "bad-body", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "x", "max_tokens": -rng.randint(1, 9)}})
    lines.append({"custom_id": "bad-url", "method": "POST", "url": "/v1/no-such-endpoint", "body": {}})
    lines.append({"custom_id": "streamed", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "x", "max_tokens": 4, "stream": 1}})  # pydantic reads 1 as true
    return lines


def run_batch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FUSEC, "run-batch", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_batch_file_answers_every_line_like_the_server(tmp_path):
    from fusec import LLM, SamplingParams

    requests = _requests(random.Random(7))
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests) + "\n")  # a trailing blank line is skipped
    res = run_batch("-i", str(src), "-o", str(dst), "--served-model-name", "smol", "smol-alias", "--max-model-len", "2048",
                    *SERVE_ARGS)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"fusec run-batch: 20 ok, 3 failed; results in {dst}"

    outputs = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == [r["custom_id"] for r in requests]
    assert len({o["id"] for o in outputs}) == len(outputs)
    for out in outputs:
        assert set(out) == {"id", "custom_id", "response", "error"}
        assert out["id"].startswith("vllm-") and out["response"]["request_id"].startswith("vllm-batch-")

    llm = LLM(max_model_len=2048, **offline_engine_args())
    try:
        for req, out in zip(requests[:20], outputs):
            assert out["error"] is None and out["response"]["status_code"] == 200, out
            body, params = req["body"], SamplingParams(temperature=0, max_tokens=req["body"]["max_tokens"])
            if req["url"] == "/v1/chat/completions":
                got = ChatCompletion.model_validate(out["response"]["body"]).choices[0].message.content
                want = llm.chat(body["messages"], params)[0].outputs[0].text
            else:
                got = Completion.model_validate(out["response"]["body"]).choices[0].text
                want = llm.generate(body["prompt"], params)[0].outputs[0].text
            assert got == want, req
    finally:
        llm.engine.close()

    bad_body, bad_url, streamed = outputs[20:]
    assert streamed["response"]["status_code"] == 400 and streamed["error"] == "Request must not be sent in stream mode"
    # vLLM's shape for an error response: its status, no body, the error body in `error`
    assert bad_body["response"]["status_code"] == 400 and bad_body["response"]["body"] is None
    assert bad_body["error"]["error"]["code"] == 400 and bad_body["error"]["error"]["param"] == "max_tokens"
    assert bad_url["response"]["status_code"] == 400 and bad_url["response"]["body"] is None
    assert bad_url["error"].startswith("URL /v1/no-such-endpoint was used. Supported endpoints: ")


def test_missing_input_and_unwritable_output_are_one_line_errors(tmp_path):
    src = tmp_path / "in.jsonl"
    res = run_batch("-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out.jsonl"))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"Error: No such file or directory: {tmp_path / 'missing.jsonl'}"]
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}) + "\n")
    res = run_batch("-i", str(src), "-o", str(tmp_path / "no-dir" / "out.jsonl"))  # refused before the model loads
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no-dir" in res.stderr


def test_a_line_that_is_not_a_request_refuses_the_file():
    good = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}})
    assert [r.custom_id for r in parse_batch([good, "", good], "in.jsonl")] == ["a", "a"]
    with pytest.raises(InputError, match=r"in.jsonl line 3: Invalid JSON"):
        parse_batch([good, "", "{not json"], "in.jsonl")
    with pytest.raises(InputError, match=r"in.jsonl line 2: .*\(custom_id\)"):
        parse_batch([good, json.dumps({"custom_id": 5, "method": "POST", "url": "/v1/completions", "body": {}})],
                    "in.jsonl")
