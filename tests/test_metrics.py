"""`/metrics` under vLLM's names, types, labels and buckets, and vLLM's log lines: a live
server takes completions and chat, streamed and not, a prompt twice (the second hits the
prefix cache), one that stops at once and one whose client leaves; then every metric is
checked against what the answers said."""
from __future__ import annotations

import json
import re
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import LiveServer, write_tiny_chat_model

pytestmark = pytest.mark.slow

GAUGES = {"num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"}
COUNTERS = {"num_preemptions", "prompt_tokens", "generation_tokens", "request_success", "prefix_cache_queries",
            "prefix_cache_hits", "prompt_tokens_cached", "prompt_tokens_by_source"}
# one observation per request
REQUEST_HISTOGRAMS = {"time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds",
                      "request_inference_time_seconds", "request_prompt_tokens", "request_generation_tokens",
                      "request_max_num_generation_tokens", "request_prefill_kv_computed_tokens", "request_params_n",
                      "request_params_max_tokens"}
HISTOGRAMS = REQUEST_HISTOGRAMS | {"inter_token_latency_seconds", "request_time_per_output_token_seconds",
                                   "iteration_tokens_total"}
STATS_LINE = re.compile(r"Engine 000: Avg prompt throughput: \d+\.\d tokens/s, Avg generation throughput: "
                        r"\d+\.\d tokens/s, Running: \d+ reqs, Waiting: \d+ reqs, (Preemptions: \d+, )?"
                        r"KV cache usage: \d+\.\d%, Prefix cache hit rate: \d+\.\d%")
MAX_MODEL_LEN = 256
EOS = 2  # the tiny model's end token


class Scrape:
    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE vllm:"):
                _, _, name, kind = line.split()
                name = name.removeprefix("vllm:")
                if not name.endswith("_created"):
                    self.types[name.removesuffix("_total") if kind == "counter" else name] = kind
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples
                        if s.name.startswith("vllm:")]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of vllm:<name> whose labels include these."""
        return sum(s.value for s in self.samples
                   if s.name == f"vllm:{name}" and labels.items() <= s.labels.items())

    def buckets(self, name: str) -> list[str]:
        return [s.labels["le"] for s in self.samples if s.name == f"vllm:{name}_bucket"]


def scrape(server: LiveServer) -> Scrape:
    return Scrape(httpx.get(server.url + "/metrics", timeout=10).text)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_path):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tinychat"), smollm2_path)


def start(model, *flags: str, stats_interval: float = 0.5) -> LiveServer:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEC_LOG_STATS_INTERVAL", str(stats_interval))
        return LiveServer("--model", str(model), "--served-model-name", "tiny", "--max-model-len",
                          str(MAX_MODEL_LEN), *flags)


def stop(server: LiveServer) -> str:
    code, out = server.stop()
    assert code == 0, out
    return out


def sse(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as res:
        assert res.status_code == 200
        return [json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: {")]


def test_vllm_metrics_and_log_lines(tiny_model):
    rng = np.random.default_rng(7)
    long_prompt = rng.integers(3, 40000, 64).tolist()  # 3 full blocks of 16 to share
    abort_prompt = rng.integers(3, 40000, 20).tolist()
    chat = [{"role": "user", "content": "Name three colours."}]
    usage_opts = {"stream_options": {"include_usage": True}}
    server = start(tiny_model)
    answers: list[tuple[str, dict, str]] = []  # (engine request id, usage, finish reason)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            def ask(path: str, body: dict) -> None:
                res = http.post(path, json=body)
                assert res.status_code == 200, res.text
                out = res.json()
                answers.append((out["id"] + "-0", out["usage"], out["choices"][0]["finish_reason"]))

            def ask_stream(path: str, body: dict) -> None:
                chunks = sse(http, path, {**body, **usage_opts})
                reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
                answers.append((chunks[0]["id"] + "-0", chunks[-1]["usage"], reasons[-1]))

            ask("/v1/completions", {"prompt": "The sky is", "max_tokens": 5, "ignore_eos": True})
            ask_stream("/v1/completions", {"prompt": "Once upon", "max_tokens": 4, "ignore_eos": True})
            ask("/v1/chat/completions", {"messages": chat, "max_tokens": 6, "ignore_eos": True})
            ask_stream("/v1/chat/completions", {"messages": chat, "max_tokens": 3, "ignore_eos": True})
            for _ in range(2):
                ask("/v1/completions", {"prompt": long_prompt, "max_tokens": 3, "ignore_eos": True})
            # the end token is the only one allowed: it stops at once
            ask("/v1/completions", {"prompt": "Stop", "max_tokens": 5, "allowed_token_ids": [EOS]})
            body = {"prompt": abort_prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as res:
                first = next(json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: "))
        abort_id = first["id"] + "-0"
        for _ in range(200):  # the engine applies the abort between steps
            m = scrape(server)
            if m.value("request_success_total", finished_reason="abort") and \
                    m.value("num_requests_running") == 0 and m.value("kv_cache_usage_perc") == 0:
                break
            time.sleep(0.05)
        time.sleep(1.2)  # a stats line about the last work
        # counters come from the engine's snapshot, the step histogram from a notice the loop runs a moment
        # later: scrape again once everything has settled
        m = scrape(server)
    finally:
        out = stop(server)

    assert [reason for _, _, reason in answers] == ["length"] * 6 + ["stop"]
    assert m.types == {**{n: "gauge" for n in GAUGES}, **{n: "counter" for n in COUNTERS},
                       **{n: "histogram" for n in HISTOGRAMS}}
    assert all(s.labels["model_name"] == "tiny" and s.labels["engine"] == "0" for s in m.samples)
    requests = len(answers) + 1
    prompt_tokens = sum(u["prompt_tokens"] for _, u, _ in answers) + len(abort_prompt)
    completion_tokens = sum(u["completion_tokens"] for _, u, _ in answers)

    # gauges: all done
    assert m.value("num_requests_running") == m.value("num_requests_waiting") == m.value("kv_cache_usage_perc") == 0
    # counters
    assert m.value("prompt_tokens_total") == prompt_tokens
    assert m.value("generation_tokens_total") > completion_tokens  # the aborted one's tokens too
    assert m.value("num_preemptions_total") == 0
    assert m.value("request_success_total", finished_reason="length") == 6
    assert m.value("request_success_total", finished_reason="stop") == 1
    assert m.value("request_success_total", finished_reason="abort") == 1
    assert m.value("request_success_total", finished_reason="error") == 0
    hits = m.value("prefix_cache_hits_total")
    assert hits >= 48  # the repeated prompt's three full blocks (chat turns share their template's too)
    assert m.value("prefix_cache_queries_total") == prompt_tokens  # every prompt looked the cache up
    assert m.value("prompt_tokens_cached_total") == hits == m.value("prompt_tokens_by_source_total",
                                                                     source="local_cache_hit")
    assert m.value("prompt_tokens_by_source_total", source="local_compute") == prompt_tokens - hits
    assert m.value("prompt_tokens_by_source_total", source="external_kv_transfer") == 0
    # histograms
    for name in REQUEST_HISTOGRAMS:
        assert m.value(f"{name}_count") == requests, name
    assert m.value("request_prompt_tokens_sum") == prompt_tokens
    assert m.value("request_prefill_kv_computed_tokens_sum") == prompt_tokens - hits
    assert m.value("request_generation_tokens_sum") > completion_tokens
    assert m.value("request_params_n_sum") == requests
    assert m.value("request_params_max_tokens_sum") == 5 + 4 + 6 + 3 + 3 + 3 + 5 + 200
    # a completion's tokens after its first are each one step's: one latency apiece
    assert m.value("inter_token_latency_seconds_count") >= completion_tokens - len(answers)
    assert 6 <= m.value("request_time_per_output_token_seconds_count") <= requests - 1  # those with 2+ tokens
    # the steps ran every uncached prompt token and every sampled token but each request's last
    assert m.value("iteration_tokens_total_count") > 0
    assert m.value("iteration_tokens_total_sum") == prompt_tokens - hits + m.value("generation_tokens_total") - requests
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds"):
        assert m.value(f"{name}_sum") > 0, name
    assert m.value("e2e_request_latency_seconds_sum") >= m.value("request_inference_time_seconds_sum") >= \
        m.value("request_decode_time_seconds_sum")
    # vLLM's bucket boundaries
    assert m.buckets("time_to_first_token_seconds")[:3] == ["0.001", "0.005", "0.01"]
    assert m.buckets("time_to_first_token_seconds")[-2:] == ["2560.0", "+Inf"]
    assert m.buckets("e2e_request_latency_seconds")[:2] == ["0.3", "0.5"]
    assert m.buckets("e2e_request_latency_seconds")[-2:] == ["7680.0", "+Inf"]
    assert m.buckets("inter_token_latency_seconds")[-2:] == ["80.0", "+Inf"]
    assert m.buckets("iteration_tokens_total") == [str(float(b)) for b in
                                                    (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                                     16384)] + ["+Inf"]
    assert m.buckets("request_prompt_tokens") == [str(float(b)) for b in (1, 2, 5, 10, 20, 50, 100, 200)] + ["+Inf"]
    assert m.buckets("request_params_n") == ["1.0", "2.0", "5.0", "10.0", "20.0", "+Inf"]

    # the log: a line per request, the aborted one too, and the periodic stats
    for request_id, usage, reason in answers:
        assert (f"Finished request {request_id}: prompt tokens {usage['prompt_tokens']}, output tokens "
                f"{usage['completion_tokens']}, finish reason {reason}") in out
    assert re.search(rf"Finished request {abort_id}: prompt tokens 20, output tokens [1-9]\d*, finish reason abort",
                     out)
    assert STATS_LINE.search(out), out[-3000:]


def test_disable_log_stats_and_requests(tiny_model):
    def run(*flags: str) -> str:
        server = start(tiny_model, *flags, stats_interval=0.2)
        try:
            res = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 8,
                                                                    "ignore_eos": True}, timeout=60)
            assert res.status_code == 200
            time.sleep(0.8)  # several intervals
        finally:
            out = stop(server)
        return out

    quiet_stats = run("--disable-log-stats")
    assert "Avg prompt throughput" not in quiet_stats and "Finished request cmpl-" in quiet_stats
    quiet_requests = run("--disable-log-requests")
    assert STATS_LINE.search(quiet_requests) and "Finished request" not in quiet_requests
