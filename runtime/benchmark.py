"""The direct-engine benchmark behind `fusec bench`: throughput and latency per
concurrency level, no HTTP."""
from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from fusec import __version__
from fusec.errors import FusecError
from fusec.fusion.traffic import WeightTraffic, weight_traffic
from fusec.runtime.engine import EngineConfig, LLMEngine
from fusec.runtime.sequence import SamplingParams
from fusec.runtime.structured_output import StructuredOutputsParams

# `--structured`: every request under this schema. Its 64 required items run past any
# default output length, so constrained requests decode as many tokens as free ones.
BENCH_SCHEMA = {
    "type": "array", "minItems": 64,
    "items": {"type": "object", "additionalProperties": False, "required": ["id", "name", "tags"],
              "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 100000},
                             "name": {"type": "string", "maxLength": 12},
                             "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}},
}
BENCH_CONSTRAINT = StructuredOutputsParams.build(json=BENCH_SCHEMA)


@dataclass
class LevelResult:
    n: int  # concurrent requests
    num_prompts: int
    input_len: int
    output_len: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    peak_rss_mb: float
    profile: dict[str, float] = field(default_factory=dict)  # StepProfile.summary() of this level
    structured: bool = False  # every request under BENCH_CONSTRAINT


@dataclass
class BenchReport:
    model: str
    dtype: str
    executor: str
    startup_s: float
    weights: str = ""  # what the weights run as (Model.weight_types)
    activations_note: str = ""  # ModelRunner.activations_note: int8 in quantized GEMVs
    kv_dtype: str = ""  # the KV cache's element type
    # bytes of weights one decode step of one sequence reads (routed experts: only its own), and in all
    weights_read_bytes: int = 0
    weights_total_bytes: int = 0
    machine: dict = field(default_factory=dict)
    command: str = ""
    results: list[LevelResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def machine_info() -> dict:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "fusec": __version__,
            "platform": platform.platform()}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else 0.0


def run_level(engine: LLMEngine, n: int, num_prompts: int, input_len: int, output_len: int, ignore_eos: bool,
              seed: int, progress: Callable[[int], None] | None = None, structured: bool = False) -> LevelResult:
    """num_prompts requests of random token ids, at most n in flight at once (each
    under BENCH_CONSTRAINT with `structured`)."""
    rng = np.random.default_rng(seed)
    vocab = engine.model.config.vocab_size
    prompts = [rng.integers(0, vocab, input_len).tolist() for _ in range(num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=ignore_eos,
                            structured_outputs=BENCH_CONSTRAINT if structured else None)
    pending = list(enumerate(prompts))
    arrival: dict[str, float] = {}
    last_seen: dict[str, tuple[int, float]] = {}
    ttft, itl = [], []
    out_tokens = 0
    done: set[str] = set()
    engine.profile.reset()
    start = time.perf_counter()

    def submit() -> None:
        while pending and len(arrival) - len(done) < n:
            i, ids = pending.pop(0)
            rid = f"b{n}-{i}"
            arrival[rid] = time.perf_counter()
            engine.add_request(rid, None, params, prompt_token_ids=ids)

    submit()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            count = len(out.outputs[0].token_ids)
            prev_count, prev_time = last_seen.get(out.request_id, (0, arrival[out.request_id]))
            if count > prev_count:
                if prev_count == 0:
                    ttft.append(now - arrival[out.request_id])
                else:
                    itl.extend([(now - prev_time) / (count - prev_count)] * (count - prev_count))
                if progress:
                    progress(count - prev_count)
                last_seen[out.request_id] = (count, now)
            if out.finished:
                done.add(out.request_id)
                out_tokens += count
        submit()
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return LevelResult(n, num_prompts, input_len, output_len, wall, out_tokens, out_tokens / wall,
                       _pct(ttft, 50), _pct(ttft, 95), _pct(itl, 50), _pct(itl, 95), rss, engine.profile.summary(),
                       structured)


def decode_traffic(engine: LLMEngine) -> WeightTraffic | None:
    """Weights a decode step of one sequence reads through the fused plans (None on the
    reference executor, which has no plans)."""
    plans = getattr(engine.runner.executor, "plans", None)
    if plans is None:
        return None
    return weight_traffic(plans["gemv"], engine.model.weight_bytes(), tokens=1)


def benchmark(config: EngineConfig, levels: list[int], input_len: int, output_len: int, num_prompts: int | None,
              ignore_eos: bool = True, seed: int = 0, progress_factory=None, structured: bool = False
              ) -> BenchReport:
    """Each level free; with `structured`, then again with every request constrained."""
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    # one short request so plan binding and first-touch costs stay out of the first level
    run_level(engine, 1, 1, min(input_len, 8), 2, True, seed + 10_000)
    startup = time.perf_counter() - t0
    traffic = decode_traffic(engine)
    report = BenchReport(engine.model.name, engine.model.dtype.value, config.executor, startup,
                         weights=engine.model.weight_types(), activations_note=engine.runner.activations_note,
                         kv_dtype=engine.runner.kv_dtype.value,
                         weights_read_bytes=traffic.read if traffic else 0,
                         weights_total_bytes=traffic.total if traffic else 0,
                         machine=machine_info(), command=" ".join(["fusec"] + sys.argv[1:]))
    if structured:  # compile the schema (and llguidance's tokenizer) outside the timed levels
        if engine.grammars is None:
            engine.close()
            raise FusecError("--structured needs a model with a tokenizer")
        engine.grammars.compile(BENCH_CONSTRAINT)
    for n in levels:
        for constrained in (False, True) if structured else (False,):
            count = num_prompts or n
            bar = progress_factory(n, count * output_len) if progress_factory else None
            report.results.append(run_level(engine, n, count, input_len, output_len, ignore_eos, seed + n,
                                            bar.update if bar else None, constrained))
            if bar:
                bar.close()
    engine.close()
    return report


def plot(report: BenchReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r.n for r in report.results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r.output_tok_s for r in report.results], marker="o", label="fusec")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (N)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{report.model} ({report.dtype}, {report.executor})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
