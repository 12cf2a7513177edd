"""`fusec autotune`: per-device choices, measured and stored in the kernel cache.

What is tuned, per (device, model shape):
- the GEMV <-> GEMM crossover: the largest batch (tokens) for which the fused-GEMV plan
  beats the library-GEMM plan, timed on real decode steps of the model;
- on a GPU, the cuBLASLt algorithm for every GEMM shape of the model and M bucket,
  chosen among up to 32 that cuBLASLt's heuristic offers (`runtime.backends.cublaslt`).

The store is one JSON file per device under <cache>/autotune/; the engine reads it
at startup (`ModelRunner`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fusec.fusion.cache import default_cache_dir
from fusec.models.loader import Model

log = logging.getLogger(__name__)

CROSSOVER_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def crossover_candidates(max_tokens: int) -> list[int]:
    """The batch sizes tune_crossover tries, up to max_tokens."""
    return [c for c in CROSSOVER_CANDIDATES if c <= max_tokens]


@dataclass
class Tuning:
    crossover: int
    crossover_ms: dict[str, list[float]] = field(default_factory=dict)  # T -> [gemv ms, gemm ms]
    gemm_algos: dict[str, str] = field(default_factory=dict)  # "N,K,dtype,M bucket" -> algo bytes (hex)


def model_key(model: Model) -> str:
    """What the tuning depends on: the model's shapes, its dtype and the types its
    weights run in (a q4_1 GEMV and an f32 one cross over at other sizes), not its
    weights' values."""
    c = model.config
    spec = (f"{c.architecture}|{c.hidden_size}|{c.intermediate_size}|{c.num_layers}|{c.num_heads}|"
            f"{c.num_kv_heads}|{c.head_dim}|{c.vocab_size}|{model.dtype.value}|{model.weight_types()}")
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


class TuningStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_dir()) / "autotune"

    def path(self, device: str) -> Path:
        return self.root / f"{hashlib.sha256(device.encode()).hexdigest()[:16]}.json"

    def _load(self, device: str) -> dict[str, Any]:
        try:
            data = json.loads(self.path(device).read_text())
        except (OSError, ValueError):
            return {"device": device, "models": {}}
        return data if isinstance(data, dict) and isinstance(data.get("models"), dict) else \
            {"device": device, "models": {}}

    def get(self, device: str, model: str) -> Tuning | None:
        entry = self._load(device)["models"].get(model)
        if not isinstance(entry, dict):
            return None
        try:
            return Tuning(**{k: v for k, v in entry.items() if k in Tuning.__dataclass_fields__})
        except TypeError:  # written by another version
            return None

    def put(self, device: str, model: str, tuning: Tuning, label: str = "") -> Path:
        data = self._load(device)
        data["models"][model] = {**asdict(tuning), "label": label} if label else asdict(tuning)
        path = self.path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
        return path


def _decode_step_ms(runner, num_seqs: int, context: int, repeats: int) -> float:
    """Median time of one decode step of num_seqs sequences of `context` cached tokens."""
    from fusec.runtime.model_runner import SequenceChunk

    blocks_per_seq = -(-(context + 1) // runner.block_size)
    rng = np.random.default_rng(num_seqs)
    chunks = [SequenceChunk([int(rng.integers(runner.vocab))], context,
                            list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))) for i in range(num_seqs)]
    inputs = runner.prepare(chunks)
    runner.run(inputs)  # warm-up: binding, first touch
    runner.device.sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(inputs)
        runner.device.sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def tune_crossover(runner, max_tokens: int, repeats: int = 5, context: int = 64,
                   progress: Callable[[], None] | None = None) -> tuple[int, dict[str, list[float]]]:
    """The largest candidate T up to which every decode step is faster through the
    fused-GEMV plan than through the GEMM plan, and the timings [gemv ms, gemm ms] per T
    (measured up to the first T where the GEMMs win). Where the GEMV plan wins at every
    T tried, the device's default crossover stands (the host's is far above the
    candidates: its GEMV tiles beat the library GEMM at every batch measured), never
    the largest T tried."""
    executor = runner.executor
    original = executor.options
    default = runner.device.plan_options(original.max_positions).crossover
    timings: dict[str, list[float]] = {}
    best = 0
    try:
        for t in crossover_candidates(max_tokens):
            pair = []
            for crossover in (t, t - 1):  # t in the gemv plan, then in the gemm plan
                executor.options = replace(original, crossover=crossover)
                pair.append(_decode_step_ms(runner, t, context, repeats))
            timings[str(t)] = pair
            if progress:
                progress()
            if pair[0] > pair[1]:  # the GEMMs win from here on
                return max(best, 1), timings
            best = t
    finally:
        executor.options = original
    return max(best, default), timings


def gemm_key(shape) -> str:
    return f"{shape.out_features},{shape.in_features},{shape.dtype.value},{shape.y_dtype.value},{shape.tokens}"


def parse_gemm_key(key: str):
    from fusec.fusion.dtypes import DType
    from fusec.runtime.device import GemmShape

    n, k, dtype, y_dtype, m = key.split(",")
    return GemmShape(int(m), int(n), int(k), DType(dtype), DType(y_dtype))


def tune_gemms(device, library, shapes, iterations: int = 20, max_algos: int = 32,
               progress: Callable[[], None] | None = None) -> dict[str, tuple[float, float, str]]:
    """For each GEMM shape: (heuristic's choice ms, best ms, best algorithm as hex)."""
    out = {}
    for shape in shapes:
        bufs = {}
        for name, rows, cols, dtype in (("x", shape.tokens, shape.in_features, shape.dtype),
                                        ("w", shape.out_features, shape.in_features, shape.dtype),
                                        ("y", shape.tokens, shape.out_features, shape.y_dtype)):
            bufs[name] = device.buffer((rows, cols), dtype.storage)
            device.fill_random(bufs[name], dtype, 0, len(bufs), 1.0, 0.0)
        times = []
        for algo in library.candidates(shape, max_algos):
            def call(algo=algo) -> None:
                library.matmul(shape, bufs["x"].ptr, bufs["w"].ptr, bufs["y"].ptr, device.stream_handle, algo)
            call()
            device.sync()
            start = time.perf_counter()
            for _ in range(iterations):
                call()
            device.sync()
            times.append((1000 * (time.perf_counter() - start) / iterations, algo))
        if times:
            best_ms, best = min(times, key=lambda t: t[0])
            out[gemm_key(shape)] = (times[0][0], best_ms, library.algo_bytes(best).hex())
        if progress:
            progress()
    return out
