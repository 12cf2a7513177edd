"""Where a host decode step's time goes, kernel by kernel: the launches of the captured
decode graph for N sequences, each timed alone on one thread (cache-warm), then the
whole graph replayed on one thread and on all of them (weights streamed from memory).
Usage:
  .venv/bin/python bench/kernel_profile.py [--n 1] [--context 100] [--model PATH] [--no-int8-activations]
"""
from __future__ import annotations

import argparse
import collections
import os
import time

from fusec.fusion.codegen import host_graph
from fusec.fusion.codegen.host import HostLauncher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1, help="sequences in the decode step")
    ap.add_argument("--context", type=int, default=32, help="prompt tokens per sequence (the KV read)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--int8-activations", action=argparse.BooleanOptionalAction, default=None,
                    help="as fusec's flag [default: on CPUs with AVX-512 VNNI]")
    args = ap.parse_args()

    captured: list[list[host_graph.HostCall]] = []
    build = host_graph.HostGraph.__init__

    def record(self, calls, launcher, program=None) -> None:
        captured.append(list(calls))
        build(self, calls, launcher, program)

    from fusec.runtime.llm import LLM
    from fusec.runtime.sequence import SamplingParams

    host_graph.HostGraph.__init__ = record  # the engine captures a graph per batch bucket
    try:
        llm = LLM(args.model, max_num_seqs=args.n, device="cpu", int8_activations=args.int8_activations)
        calls = captured[-1]  # the largest decode bucket: N sequences (prefills are captured too)
        prompt = list(range(1, args.context + 1))
        llm.generate(prompt_token_ids=[prompt] * args.n,
                     sampling_params=SamplingParams(max_tokens=2, ignore_eos=True))
    finally:
        host_graph.HostGraph.__init__ = build
    per_kernel: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for call in calls:
        gx, gy = call.grid
        run = lambda: call.kernel.fn(*call.values, gx, 0, gx * gy)  # noqa: E731
        run()
        start = time.perf_counter()
        for _ in range(args.repeats):
            run()
        per_kernel[call.kernel.name] += (time.perf_counter() - start) / args.repeats
        count[call.kernel.name] += 1
    print(f"decode step, {args.n} sequences of ~{args.context} tokens: {len(calls)} launches")
    for name, seconds in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
        print(f"{1e3 * seconds:9.3f} ms  {count[name]:3d} x {1e6 * seconds / count[name]:8.1f} us  {name}")
    print(f"{1e3 * sum(per_kernel.values()):9.3f} ms  summed (one thread, each launch cache-warm)")
    for threads in sorted({1, os.cpu_count() or 1}):
        launcher = HostLauncher(threads)
        graph = host_graph.HostGraph(calls, launcher)
        for _ in range(3):
            graph.replay()
        best = float("inf")  # the best of 5 batches: a shared machine's neighbours come and go
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(max(1, args.repeats // 5)):
                graph.replay()
            best = min(best, (time.perf_counter() - start) / max(1, args.repeats // 5))
        print(f"{1e3 * best:9.3f} ms  replayed on {threads} thread(s) (best of 5 batches)")
        launcher.close()


if __name__ == "__main__":
    main()
