"""Prometheus metrics of one server under vLLM's names, types, labels and buckets (its own
registry: nothing global), and the per-request log line.

Where each number comes from, so that nothing waits on the engine thread:
- gauges and counters: the engine's load snapshot (EngineLoad), read whole at scrape time;
- per-request histograms: the timestamps the engine stamps on each output it hands over
  (RequestMetrics, a copy per output), observed on the event loop as the outputs come;
- vllm:iteration_tokens_total: the engine loop's per-step notices (AsyncEngine.watch_steps).
"""
from __future__ import annotations

import logging
import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fusec.runtime.async_engine import AsyncEngine
from fusec.runtime.outputs import RequestOutput
from fusec.runtime.sequence import SamplingParams

log = logging.getLogger("fusec.server")

LABELS = ["model_name", "engine"]
ENGINE = "0"  # vLLM labels each metric with its engine core's index; fusec runs one engine
FINISH_REASONS = ("stop", "length", "abort", "error")  # the series vLLM shows from the start

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


class EngineCollector(Collector):
    """The load gauges and token counters, from one snapshot per scrape."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.labels = [model_name, ENGINE]

    def collect(self) -> Iterator[Metric]:
        load = self.engine.load()
        computed = load.prompt_tokens - load.cached_prompt_tokens
        gauges = [("vllm:num_requests_running", "Number of requests in model execution batches.", load.running),
                  ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", load.waiting),
                  ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", load.kv_usage)]
        counters = [
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", load.preemptions),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", load.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", load.generation_tokens),
            ("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).",
             load.cached_prompt_tokens),
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             load.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             load.prefix_cache_hits)]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(self.labels, value)
            yield family
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(self.labels, value)
            yield family
        by_source = CounterMetricFamily("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                                        labels=LABELS + ["source"])
        for source, value in (("local_compute", computed), ("local_cache_hit", load.cached_prompt_tokens),
                              ("external_kv_transfer", 0)):
            by_source.add_metric(self.labels + [source], value)
        yield by_source


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str, log_requests: bool = True) -> None:
        self.engine = engine
        self.log_requests = log_requests
        self.max_model_len = engine.engine.max_model_len
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        labels = [model_name, ENGINE]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry).labels(*labels)

        lengths = buckets_1_2_5(self.max_model_len)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.", ITERATION_TOKEN_BUCKETS)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prompt_len = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", lengths)
        self.generation_len = histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                        lengths)
        self.max_generation_len = histogram("vllm:request_max_num_generation_tokens",
                                            "Histogram of maximum number of requested generation tokens.", lengths)
        self.prefill_kv_computed = histogram("vllm:request_prefill_kv_computed_tokens",
                                             "Histogram of new KV tokens computed during prefill "
                                             "(excluding cached tokens).", lengths)
        self.n = histogram("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.max_tokens = histogram("vllm:request_params_max_tokens",
                                    "Histogram of the max_tokens request parameter.", lengths)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               LABELS + ["finished_reason"], registry=self.registry)
        self.labels = labels
        for reason in FINISH_REASONS:
            self.success.labels(*labels, reason)

    def watch_steps(self) -> None:
        """Observe every engine step's tokens from now on (call it on the server's loop)."""
        self.engine.watch_steps(self.iteration_tokens.observe)

    def finished(self, reason: str) -> None:
        self.success.labels(*self.labels, reason).inc()

    def track(self, request_id: str, num_prompt_tokens: int, params: SamplingParams,
              arrival: float) -> RequestStats:
        return RequestStats(self, request_id, num_prompt_tokens, params, arrival)

    def pooled(self, request_id: str, num_prompt_tokens: int, arrival: float) -> None:
        """An embedding request that finished: counted and logged as vLLM counts a pooling
        request (no generated tokens, so no token latencies)."""
        self.finished("stop")
        self.e2e.observe(time.monotonic() - arrival)
        self.prompt_len.observe(num_prompt_tokens)
        if self.log_requests:
            log.info("Finished request %s: prompt tokens %d, embedding", request_id, num_prompt_tokens)


class RequestStats:
    """One engine request (one prompt, its n completions) as the server sees it: the
    token latencies as its outputs come, the per-request histograms and the log line
    when it ends. A request is counted once; vllm:request_success counts each completion
    (vLLM runs n > 1 as n child requests). Phases a request never reached (it left
    before it was scheduled, or before its first token) are not observed."""

    def __init__(self, metrics: ServerMetrics, request_id: str, num_prompt_tokens: int, params: SamplingParams,
                 arrival: float) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.params = params
        self.arrival = arrival
        self.last: RequestOutput | None = None
        self.seen: dict[int, tuple[int, float]] = {}  # completion index -> (tokens, when the last one came)
        self.ended = False

    def update(self, out: RequestOutput) -> None:
        m, met = out.metrics, self.metrics
        if m.first_token_time is not None and (self.last is None or self.last.metrics.first_token_time is None):
            met.ttft.observe(m.first_token_time - self.arrival)
        for c in out.outputs:
            count, when = self.seen.get(c.index, (0, 0.0))
            tokens = len(c.token_ids)
            # the gap between two steps' tokens; best_of's completions show up whole at the end, untimed
            if count and tokens == count + 1:
                met.itl.observe(m.last_token_time - when)
            if tokens > count:
                self.seen[c.index] = (tokens, m.last_token_time)
        self.last = out
        if out.finished:
            self._end(None, m.finished_time)

    def close(self, reason: str = "abort") -> None:
        """The stream is over: a request that has not finished ended with `reason` now
        ("abort": the client left; "error": a step failed)."""
        if not self.ended:
            self._end(reason, time.monotonic())

    def _end(self, reason: str | None, end: float) -> None:
        self.ended = True
        met, params = self.metrics, self.params
        outs = self.last.outputs if self.last is not None else []
        reasons = [c.finish_reason or reason for c in outs] + [reason] * (params.n - len(outs))
        generated = [len(c.token_ids) for c in outs]
        for r in reasons:
            met.finished(r)
        met.e2e.observe(end - self.arrival)
        met.prompt_len.observe(self.num_prompt_tokens)
        met.generation_len.observe(sum(generated))
        met.max_generation_len.observe(max(generated, default=0))
        met.n.observe(params.n)
        met.max_tokens.observe(params.max_tokens or (met.max_model_len - self.num_prompt_tokens))  # None: the rest
        m = self.last.metrics if self.last is not None else None
        if m is not None and m.first_scheduled_time is not None:
            met.queue.observe(m.first_scheduled_time - self.arrival)
            if m.first_token_time is not None:
                decode = m.last_token_time - m.first_token_time
                met.prefill.observe(m.first_token_time - m.first_scheduled_time)
                met.decode.observe(decode)
                met.inference.observe(m.last_token_time - m.first_scheduled_time)
                met.prefill_kv_computed.observe(self.num_prompt_tokens - m.num_cached_tokens)
                if max(generated, default=0) > 1:  # the first token is the prefill's
                    met.tpot.observe(decode / (max(generated) - 1))
        if met.log_requests:
            log.info("Finished request %s: prompt tokens %d, output tokens %d, finish reason %s", self.request_id,
                     self.num_prompt_tokens, sum(generated), ",".join(reasons))
