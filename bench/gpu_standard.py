"""The GPU standard workload (DESIGN §11), fusec against HF transformers in one run, with
vLLM's published figures as a reference column.

The published Qwen2.5-7B configuration (bench/models/qwen2.5-7b) with seeded random
f16 weights, N = 1, 16, 64, 128 concurrent requests, 32-token prompts (random token
ids), 128 output tokens, greedy, end-of-sequence ignored. Measured one after another
in this process on the same GPU:
  fusec            the direct engine on the CUDA backend (`fusec bench`'s code), with
                   its step profile (host overhead per N)
  HF transformers  `generate` on the same configuration, random init, f16, SDPA
Writes bench/results/gpu-<gpu>-<date>.json, .md and .png. Usage (on a GPU machine):
  python bench/gpu_standard.py [--levels 1,16,64,128] [--output-len 128] [--skip-hf]
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from fusec.runtime.benchmark import benchmark, machine_info
from fusec.runtime.engine import EngineConfig

ROOT = Path(__file__).parent
MODEL = ROOT / "models" / "qwen2.5-7b"
RESULTS = ROOT / "results"
# vLLM 0.18, direct engine, same model shape and workload, H100 SXM (the figures)
VLLM_PUBLISHED = {1: 169.0, 16: 2524.0, 64: 8807.0, 128: 14962.0}
TARGETS = {1: 180.0, 128: 15000.0}


def gpu_name() -> str:
    from cuda.core import Device

    return Device().name


def hf_generate(levels: list[int], input_len: int, output_len: int) -> dict[int, float]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(MODEL)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: 15 GB of random init on the host takes minutes
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16, attn_implementation="sdpa")
    model = model.eval()
    out = {}
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
            out[n] = n * output_len / (time.perf_counter() - t)
            print(f"  HF transformers N={n}: {out[n]:.1f} tok/s", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def plot(path: Path, levels: list[int], fusec: dict[int, float], hf: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, [fusec[n] for n in levels], marker="o", label="fusec")
    if hf:
        ax.plot(levels, [hf[n] for n in levels], marker="s", label="HF transformers")
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,16,64,128")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    gpu = gpu_name()
    print(f"fusec on {gpu} ...", flush=True)
    config = EngineConfig(model=str(MODEL), dtype="float16", load_format="dummy", device="cuda",
                          max_num_seqs=max(levels), max_model_len=args.input_len + args.output_len + 16)
    report = benchmark(config, levels, args.input_len, args.output_len, None)
    fusec = {r.n: r.output_tok_s for r in report.results}
    for r in report.results:
        print(f"  fusec N={r.n}: {r.output_tok_s:.1f} tok/s", flush=True)
    hf = {} if args.skip_hf else hf_generate(levels, args.input_len, args.output_len)

    stamp = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    command = " ".join(["python", *sys.argv])
    machine = {**machine_info(), "gpu": gpu}
    data = {"workload": {"model": "Qwen2.5-7B configuration, seeded random f16 weights", "levels": levels,
                         "input_len": args.input_len, "output_len": args.output_len,
                         "prompts": "random token ids", "sampling": "greedy, ignore_eos"},
            "machine": machine, "command": command, "fusec": report.to_json(),
            "hf_transformers_tok_s": hf, "vllm_published_tok_s": VLLM_PUBLISHED}
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"gpu-{slug}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(data, indent=2))
    plot(base.with_suffix(".png"), levels, fusec, hf)
    lines = [f"# GPU standard workload, {stamp}", "",
             f"Machine: {gpu}; host {machine['cpu']}, {machine['cores']} cores. Command: `{command}` "
             f"(fusec's part is `fusec bench --device cuda --model bench/models/qwen2.5-7b --load-format dummy "
             f"--dtype float16 --n {args.levels} --input-len {args.input_len} --output-len {args.output_len}`).", "",
             f"fusec startup {report.startup_s:.1f} s (weights filled on the GPU, kernels, graph capture).", "",
             "| N | fusec tok/s | HF transformers tok/s | fusec / HF | vLLM published tok/s | fusec / vLLM "
             "| step ms | host overhead |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        h, v = hf.get(r.n), VLLM_PUBLISHED.get(r.n)
        lines.append(f"| {r.n} | {r.output_tok_s:.1f} | {f'{h:.1f}' if h else '-'} | "
                     f"{f'{r.output_tok_s / h:.2f}x' if h else '-'} | {f'{v:.0f}' if v else '-'} | "
                     f"{f'{r.output_tok_s / v:.2f}x' if v else '-'} | {r.profile['step_ms']:.2f} | "
                     f"{100 * r.profile['host_share']:.1f}% |")
    lines.append("")
    for n, target in TARGETS.items():
        got = fusec.get(n)
        if got is not None:
            verdict = "met" if got >= target else f"missed by {target - got:.0f} tok/s ({got / target:.0%} of it)"
            lines.append(f"- Target N={n}: {target:.0f} tok/s: {verdict}.")
    (base.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
