"""Where a GPU decode step's time goes, launch by launch, timed with CUDA events.

Builds the engine on the CUDA backend (dummy weights), decodes N sequences so the
decode plan of that batch is bound, then walks the bound launches with an event
between each two. The GPU is first kept busy with replays of the captured step, so the
host has queued every launch before the GPU reaches it and the events time the GPU
alone (no Python launch gaps). Also times the captured step's replay (what serving
runs) and the eager walk as the host issues it. Usage (on a GPU machine):
  python bench/gpu_kernel_profile.py [--n 1,128] [--context 32] [--model bench/models/qwen2.5-7b]
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
from pathlib import Path

from fusec.runtime.backends.cuda import check_driver

ROOT = Path(__file__).parent


class Events:
    """A pool of timing events on one stream."""

    def __init__(self, stream: int) -> None:
        from cuda.bindings import driver

        self.driver, self.stream = driver, stream
        self.elapsed = getattr(driver, "cuEventElapsedTime_v2", None) or driver.cuEventElapsedTime
        self.pool: list = []

    def get(self, i: int):
        while len(self.pool) <= i:
            self.pool.append(check_driver(self.driver.cuEventCreate(0)))
        return self.pool[i]

    def record(self, i: int) -> None:
        check_driver(self.driver.cuEventRecord(self.get(i), self.stream))

    def ms(self, a: int, b: int) -> float:
        check_driver(self.driver.cuEventSynchronize(self.get(b)))
        return float(check_driver(self.elapsed(self.get(a), self.get(b))))


def profile_level(llm, n: int, context: int, repeats: int) -> dict:
    from fusec.runtime.sequence import SamplingParams

    runner = llm.engine.runner
    ex, dev = runner.executor, runner.device
    prompts = [list(range(1 + i, context + 1 + i)) for i in range(n)]
    llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=3, ignore_eos=True))
    bucket = min((b for b in ex.graphs if b >= n), default=None)
    decode = [b for b in ex._bound.values() if b.dims["T"] == (bucket or n) and b.dims.get("S") == b.dims["T"]]
    bound = decode[-1]
    events = Events(dev.stream_handle)
    calls, launches = bound.calls, bound.plan.launches
    per_launch: list[list[float]] = [[] for _ in calls]
    replay_ms, eager_ms = [], []
    graph = ex.graphs.get(bucket) if bucket is not None else None
    for _ in range(repeats):
        if graph is not None:
            events.record(0)
            for _ in range(5):  # busy ahead of the walk below; also the replay's own time
                dev.replay(graph)
            events.record(1)
            replay_ms.append(events.ms(0, 1) / 5)
            for _ in range(10):
                dev.replay(graph)
        base = 2
        for i, call in enumerate(calls):
            events.record(base + i)
            call()
        events.record(base + len(calls))
        dev.sync()
        for i in range(len(calls)):
            per_launch[i].append(events.ms(base + i, base + i + 1))
        events.record(0)  # eager, as the host issues it (launch gaps included)
        for call in calls:
            call()
        events.record(1)
        eager_ms.append(events.ms(0, 1))
    by_kind: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for launch, times in zip(launches, per_launch):
        # one row per role across layers: layers.#.qkv_bias.out (gemv_...), layers.#.o.out (gemm)
        what = launch.kernel.name.rsplit("_", 1)[0] if launch.kind == "kernel" else "cuBLASLt"
        role = re.sub(r"[.]\d+[.]", ".#.", launch.name)
        name = f"{role} ({what})"
        by_kind[name] += statistics.median(times)
        count[name] += 1
    summed = sum(by_kind.values())
    return {"n": n, "bucket": bucket, "launches": len(calls), "plan": bound.plan.bucket,
            "replay_ms": statistics.median(replay_ms) if replay_ms else None,
            "eager_ms": statistics.median(eager_ms), "gpu_summed_ms": summed,
            "kernels": [{"name": k, "count": count[k], "ms": v, "share": v / summed}
                        for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="1,128")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--model", default=str(ROOT / "models" / "qwen2.5-7b"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    levels = [int(x) for x in args.n.split(",")]

    from fusec.runtime.engine import EngineConfig
    from fusec.runtime.llm import LLM

    llm = LLM(config=EngineConfig(model=args.model, dtype="float16", load_format="dummy", device="cuda",
                                  max_num_seqs=max(levels), max_model_len=args.context + 64))
    out = []
    for n in levels:
        r = profile_level(llm, n, args.context, args.repeats)
        out.append(r)
        replay = f"{r['replay_ms']:.3f}" if r["replay_ms"] is not None else "-"
        print(f"\nN={n} (plan {r['plan']}, bucket {r['bucket']}): {r['launches']} launches; step replay {replay} ms, "
              f"eager walk {r['eager_ms']:.3f} ms, GPU time summed {r['gpu_summed_ms']:.3f} ms")
        for k in r["kernels"]:
            print(f"  {k['ms']:8.3f} ms {100 * k['share']:5.1f}%  {k['count']:4d} x  {k['name']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
