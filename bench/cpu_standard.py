"""The CPU standard workload (DESIGN §11), fusec against its peers in one run.

SmolLM2-135M-Instruct (the default model's GGUF), N = 1, 8, 32 concurrent requests,
32-token prompts (random token ids), 128 output tokens, greedy, end-of-sequence ignored.
Measured in the same process, one after another:
  fusec              the direct engine (fused plans on the host), `fusec bench`'s code
  HF transformers    `generate` on the same GGUF (dequantized to float32 by transformers)
  llama.cpp          llama-cpp-python on the same GGUF (Q4_1 weights), N = 1 only: its
                     high-level API decodes one sequence at a time
Writes bench/results/cpu-<date>[-<label>].json and .md. Usage:
  .venv/bin/python bench/cpu_standard.py [--levels 1,8,32] [--output-len 128] [--no-peers] [--label L]
--no-peers measures fusec alone (an A/B of two fusec versions: run this file with
each version's interpreter and a label apiece).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

from fusec.models.loader import default_model_path
from fusec.runtime.benchmark import benchmark, machine_info
from fusec.runtime.engine import EngineConfig

RESULTS = Path(__file__).parent / "results"


def hf_generate(levels: list[int], input_len: int, output_len: int) -> dict[int, float]:
    import torch
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    out = {}
    rng = np.random.default_rng(0)
    with torch.no_grad():
        model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for n in levels:
            ids = torch.tensor(rng.integers(0, model.config.vocab_size, (n, input_len)))
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                           min_new_tokens=output_len, do_sample=False)
            out[n] = n * output_len / (time.perf_counter() - t)
            print(f"  HF transformers N={n}: {out[n]:.1f} tok/s", flush=True)
    return out


def llama_cpp(input_len: int, output_len: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("  llama.cpp: llama-cpp-python not installed (pip install llama-cpp-python)", flush=True)
        return None
    import os

    llm = Llama(model_path=str(default_model_path()), n_ctx=input_len + output_len + 8, n_threads=os.cpu_count(),
                n_batch=input_len, verbose=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, llm.n_vocab(), input_len).tolist()

    def run(count: int) -> float:
        llm.reset()
        t = time.perf_counter()
        for i, _ in enumerate(llm.generate(tokens, temp=0.0, top_k=1, reset=True)):
            if i + 1 == count:
                break
        return count / (time.perf_counter() - t)

    run(4)
    rate = run(output_len)
    print(f"  llama.cpp N=1: {rate:.1f} tok/s", flush=True)
    return rate


def fusec_commit() -> str:
    """The commit of the fusec that was imported (the A/B's two versions differ here)."""
    import subprocess

    import fusec

    res = subprocess.run(["git", "-C", str(Path(fusec.__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--no-peers", action="store_true", help="fusec only: skip HF transformers and llama.cpp")
    ap.add_argument("--label", default="", help="suffix of the result files, e.g. the version measured")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    print("fusec ...", flush=True)
    config = EngineConfig(max_num_seqs=max(levels), max_model_len=args.input_len + args.output_len + 16)
    report = benchmark(config, levels, args.input_len, args.output_len, None)
    for r in report.results:
        print(f"  fusec N={r.n}: {r.output_tok_s:.1f} tok/s", flush=True)
    hf, lcpp = {}, None
    if not args.no_peers:
        print("HF transformers ...", flush=True)
        hf = hf_generate(levels, args.input_len, args.output_len)
        print("llama.cpp ...", flush=True)
        lcpp = llama_cpp(args.input_len, args.output_len)

    stamp = datetime.date.today().isoformat() + (f"-{args.label}" if args.label else "")
    command = " ".join([".venv/bin/python", *sys.argv])
    data = {"workload": {"model": report.model, "levels": levels, "input_len": args.input_len,
                         "output_len": args.output_len, "prompts": "random token ids", "sampling": "greedy, ignore_eos"},
            "machine": machine_info(), "command": command, "fusec_commit": fusec_commit(), "fusec": report.to_json(),
            "hf_transformers_tok_s": hf, "llama_cpp_tok_s_n1": lcpp}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"cpu-{stamp}.json").write_text(json.dumps(data, indent=2))
    lines = [f"# CPU standard workload, {stamp}", "",
             f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores. Command: `{command}` "
             f"(fusec at {data['fusec_commit']})", "",
             f"Model {report.model} ({report.dtype}, fused plans), prompts of {args.input_len} random token ids, "
             f"{args.output_len} output tokens, greedy, EOS ignored. fusec startup {report.startup_s:.1f} s "
             "(model load + kernels from the cache).", "",
             "| N | fusec tok/s | HF transformers tok/s | fusec / HF | llama.cpp tok/s | fusec / llama.cpp "
             "| fusec TTFT p50 | fusec ITL p50 / p95 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        h = hf.get(r.n)
        lc = lcpp if r.n == 1 else None
        lines.append(f"| {r.n} | {r.output_tok_s:.1f} | {f'{h:.1f}' if h else '-'} | "
                     f"{f'{r.output_tok_s / h:.2f}x' if h else '-'} | "
                     f"{f'{lc:.1f}' if lc else '-'} | {f'{r.output_tok_s / lc:.2f}x' if lc else '-'} | "
                     f"{r.ttft_p50_ms:.0f} ms | {r.itl_p50_ms:.1f} / {r.itl_p95_ms:.1f} ms |")
    n1 = next(r for r in report.results if r.n == min(levels))
    top = max(report.results, key=lambda r: r.n)
    lines += ["", f"Scaling: N={top.n} gives {top.output_tok_s / n1.output_tok_s:.1f}x the N={n1.n} throughput.",
              "llama.cpp runs its own Q4_1 kernels on the quantized weights; fusec and HF run float32 weights."]
    (RESULTS / f"cpu-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
