"""One decode GEMV (one token row) on the host per weight format: float32 weights
against the GGUF block formats the kernels read natively, on SmolLM2-135M's shapes.
Reports microseconds per call and the weight bytes streamed per second.
Writes bench/results/gemv-formats-<date>.md. Usage:
  .venv/bin/python bench/gemv_formats.py [--repeats 200]
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fusec.fusion.cache import KernelCache
from fusec.fusion.dtypes import DType
from fusec.kernels.gemv import Gemv, vector_width
from fusec.kernels.quant import FORMATS, quantize
from fusec.runtime.backends.cpu import HostDevice
from fusec.runtime.benchmark import machine_info

RESULTS = Path(__file__).parent / "results"
# (K, N, what): SmolLM2-135M's decode GEMVs
SHAPES = [(576, 960, "qkv"), (576, 3072, "gate|up"), (1536, 576, "down"), (576, 49152, "lm head")]
WEIGHTS = [None, "q8_0", "q5_1", "q4_1", "q4_0"]


def time_call(launch, repeats: int) -> float:
    for _ in range(5):
        launch()
    best = float("inf")
    for _ in range(3):  # the best of three batches: other load only slows a batch down
        start = time.perf_counter()
        for _ in range(repeats):
            launch()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    device = HostDevice(KernelCache(Path(tempfile.mkdtemp(prefix="fusec-gemv-"))))
    rng = np.random.default_rng(0)
    rows = []
    for k, n, what in SHAPES:
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        x = rng.standard_normal((1, k)).astype(np.float32)
        y = np.empty((1, n), np.float32)
        cells = []
        for fmt in WEIGHTS:
            data = w if fmt is None else quantize(w, FORMATS[fmt])
            spec = Gemv(k=k, n=n, act=DType.F32, weight=DType.F32, out=DType.F32, vec=vector_width(k, DType.F32),
                        weight_format=fmt)
            seconds = time_call(device.prepare_launch(spec, [x, data, y, np.int32(1)], spec.grid({"num_rows": 1})),
                                args.repeats)
            cells.append((seconds, data.nbytes))
            print(f"  {what} {k}x{n} {fmt or 'f32'}: {seconds * 1e6:.0f} us", flush=True)
        rows.append((what, k, n, cells))
    device.close()

    machine = machine_info()
    stamp = datetime.date.today().isoformat()
    command = " ".join([".venv/bin/python", *sys.argv])
    lines = [f"# Decode GEMV per weight format (host), {stamp}", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores (the kernel's grid over the host thread pool). "
             f"Command: `{command}`", "",
             "One token row, y = x @ W.T, f32 activations; best of 3 batches of "
             f"{args.repeats} calls. us per call (GB/s of weights read).", "",
             "| GEMV | K x N | " + " | ".join(f or "f32" for f in WEIGHTS) + " | f32 / q4_1 |",
             "|---|---|" + "---|" * len(WEIGHTS) + "---|"]
    for what, k, n, cells in rows:
        text = [f"{s * 1e6:.0f} ({b / s / 1e9:.1f})" for s, b in cells]
        lines.append(f"| {what} | {k} x {n} | " + " | ".join(text) + f" | {cells[0][0] / cells[3][0]:.1f}x |")
    total = [sum(r[3][i][0] for r in rows) for i in range(len(WEIGHTS))]
    lines.append("| all four | | " + " | ".join(f"{t * 1e6:.0f}" for t in total) + f" | {total[0] / total[3]:.1f}x |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"gemv-formats-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
