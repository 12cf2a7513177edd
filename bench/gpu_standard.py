"""The GPU standard workload (DESIGN §11), fusec against HF transformers in one run, with
vLLM's published figures as a reference column.

The published Qwen2.5-7B configuration (bench/models/qwen2.5-7b) with seeded random
f16 weights, N = 1, 16, 64, 128 concurrent requests, 32-token prompts (random token
ids), 128 output tokens, greedy, end-of-sequence ignored. Measured one after another
on the same GPU, each in a process of its own (a process keeps the GPU memory its pool
reserved until it exits):
  fusec            `fusec bench --device cuda --profile` (the direct engine on the CUDA
                   backend, with its step profile: host overhead per N), or the JSON of
                   such a run given with --fusec-json (bench/gpu_check.sh makes one)
  HF transformers  `generate` on the same configuration, random init, f16, SDPA
Writes bench/results/gpu-<gpu>-<date>.json, .md and .png. Usage (on a GPU machine):
  python bench/gpu_standard.py [--levels 1,16,64,128] [--output-len 128] [--fusec-json F] [--skip-hf]
The results are rewritten as each row is measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fusec.runtime.benchmark import machine_info

ROOT = Path(__file__).parent
MODEL = ROOT / "models" / "qwen2.5-7b"
RESULTS = ROOT / "results"
# vLLM 0.18, direct engine, same model shape and workload, H100 SXM (the figures)
VLLM_PUBLISHED = {1: 169.0, 16: 2524.0, 64: 8807.0, 128: 14962.0}
TARGETS = {1: 180.0, 128: 15000.0}


def gpu_name() -> str:
    from cuda.core import Device

    return Device().name


def fusec_bench(levels: list[int], input_len: int, output_len: int, json_path: Path) -> dict:
    """`fusec bench` in a process of its own: the GPU memory it reserved is the driver's
    again when it exits, for HF transformers after it."""
    cmd = [sys.executable, "-P", "-m", "fusec.cli.main", "bench", "--device", "cuda", "--model", str(MODEL),
           "--load-format", "dummy", "--dtype", "float16", "--n", ",".join(map(str, levels)),
           "--input-len", str(input_len), "--output-len", str(output_len), "--profile", "--json", str(json_path)]
    subprocess.run(cmd, check=True)
    return json.loads(json_path.read_text())


def hf_generate(levels: list[int], input_len: int, output_len: int, done: Callable[[int, float], None]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(MODEL)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: 15 GB of random init on the host takes minutes
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16, attn_implementation="sdpa")
    model = model.eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        warm = torch.tensor([[1, 2, 3, 4]], device="cuda")
        model.generate(warm, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for n in levels:
            ids = torch.tensor(rng.integers(0, config.vocab_size, (n, input_len)), device="cuda")
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                           min_new_tokens=output_len, do_sample=False)
            torch.cuda.synchronize()
            tok_s = n * output_len / (time.perf_counter() - t)
            print(f"  HF transformers N={n}: {tok_s:.1f} tok/s", flush=True)
            done(n, tok_s)


def plot(path: Path, levels: list[int], fusec: dict[int, float], hf: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, [fusec[n] for n in levels], marker="o", label="fusec")
    if hf:
        measured = [n for n in levels if n in hf]  # HF rows land one at a time
        ax.plot(measured, [hf[n] for n in measured], marker="s", label="HF transformers")
    ref = [n for n in levels if n in VLLM_PUBLISHED]
    ax.plot(ref, [VLLM_PUBLISHED[n] for n in ref], marker="^", linestyle="--", label="vLLM 0.18 (published)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent requests (N)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Qwen2.5-7B shape, f16, 32 in / 128 out")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_results(base: Path, args, gpu: str, report: dict, hf: dict[int, float]) -> None:
    """The .json, .md and .png for what has been measured so far."""
    levels = [r["n"] for r in report["results"]]
    fusec = {r["n"]: r["output_tok_s"] for r in report["results"]}
    command = " ".join(["python", *sys.argv])
    machine = {**machine_info(), "gpu": gpu}
    data = {"workload": {"model": "Qwen2.5-7B configuration, seeded random f16 weights", "levels": levels,
                         "input_len": args.input_len, "output_len": args.output_len,
                         "prompts": "random token ids", "sampling": "greedy, ignore_eos"},
            "machine": machine, "command": command, "fusec": report,
            "hf_transformers_tok_s": hf, "vllm_published_tok_s": VLLM_PUBLISHED}
    base.with_suffix(".json").write_text(json.dumps(data, indent=2))
    plot(base.with_suffix(".png"), levels, fusec, hf)
    lines = [f"# GPU standard workload, {datetime.date.today().isoformat()}", "",
             f"Machine: {gpu}; host {machine['cpu']}, {machine['cores']} cores. Command: `{command}` "
             f"(fusec's part is `fusec bench --device cuda --model bench/models/qwen2.5-7b --load-format dummy "
             f"--dtype float16 --n {','.join(map(str, levels))} --input-len {args.input_len} "
             f"--output-len {args.output_len} --profile`).", "",
             f"fusec startup {report['startup_s']:.1f} s (weights filled on the GPU, kernels, graph capture).", "",
             "| N | fusec tok/s | HF transformers tok/s | fusec / HF | vLLM published tok/s | fusec / vLLM "
             "| step ms | host overhead |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        n, got = r["n"], r["output_tok_s"]
        h, v, prof = hf.get(n), VLLM_PUBLISHED.get(n), r.get("profile") or {}
        step = f"{prof['step_ms']:.2f}" if "step_ms" in prof else "-"
        host = f"{100 * prof['host_share']:.1f}%" if "host_share" in prof else "-"
        lines.append(f"| {n} | {got:.1f} | {f'{h:.1f}' if h else '-'} | {f'{got / h:.2f}x' if h else '-'} | "
                     f"{f'{v:.0f}' if v else '-'} | {f'{got / v:.2f}x' if v else '-'} | {step} | {host} |")
    lines.append("")
    for n, target in TARGETS.items():
        got = fusec.get(n)
        if got is not None:
            verdict = "met" if got >= target else f"missed by {target - got:.0f} tok/s ({got / target:.0%} of it)"
            lines.append(f"- Target N={n}: {target:.0f} tok/s: {verdict}.")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,16,64,128")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--fusec-json", type=Path, default=None,
                    help="reuse this `fusec bench --json` report of the same workload instead of running it")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    gpu = gpu_name()
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    base = RESULTS / f"gpu-{slug}-{datetime.date.today().isoformat()}"
    if args.fusec_json is not None:
        report = json.loads(args.fusec_json.read_text())
    else:
        print(f"fusec on {gpu} ...", flush=True)
        report = fusec_bench(levels, args.input_len, args.output_len, base.with_suffix(".fusec.json"))
    for r in report["results"]:
        print(f"  fusec N={r['n']}: {r['output_tok_s']:.1f} tok/s", flush=True)
    hf: dict[int, float] = {}
    write_results(base, args, gpu, report, hf)  # each row is kept as soon as it is measured
    if not args.skip_hf:
        def done(n: int, tok_s: float) -> None:
            hf[n] = tok_s
            write_results(base, args, gpu, report, hf)
        hf_generate(levels, args.input_len, args.output_len, done)


if __name__ == "__main__":
    main()
