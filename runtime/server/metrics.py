"""Prometheus metrics of one server (its own registry: nothing global)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fusec.runtime.async_engine import AsyncEngine

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str, fn) -> None:
            Gauge(name, doc, labels, registry=self.registry).labels(model_name).set_function(fn)

        gauge("fusec:num_requests_running", "Sequences being generated.", lambda: engine.load().running)
        gauge("fusec:num_requests_waiting", "Sequences waiting to be scheduled.", lambda: engine.load().waiting)
        gauge("fusec:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", lambda: engine.load().kv_usage)
        gauge("fusec:num_preemptions", "Preemptions since start.", lambda: engine.load().preemptions)
        self.prompt_tokens = Counter("fusec:prompt_tokens", "Prompt tokens received.", labels,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("fusec:generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry).labels(model_name)
        self.requests = Counter("fusec:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self.model_name = model_name
        self.ttft = Histogram("fusec:time_to_first_token_seconds", "Time to the first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("fusec:inter_token_latency_seconds", "Time between tokens of a sequence.", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("fusec:e2e_request_latency_seconds", "Request latency, arrival to finish.", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)

    def finished(self, reason: str) -> None:
        self.requests.labels(self.model_name, reason).inc()
