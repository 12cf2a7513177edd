"""`fusec autotune`: the crossover measured on this CPU, cuBLASLt algorithms chosen on the
host-memory CUDA double, both stored and picked up by the engine's runner."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from fusec.cli.autotune import autotune_cmd
from fusec.models.loader import load_model
from fusec.runtime.autotune import CROSSOVER_CANDIDATES, TuningStore, model_key
from fusec.runtime.backends.cpu import HostDevice
from fusec.runtime.device import HOST_CROSSOVER
from fusec.runtime.config import EngineConfig
from fusec.runtime.model_runner import ModelRunner

FUSEC = str(Path(sys.executable).with_name("fusec"))


def test_autotune_cpu_crossover_is_stored_and_used(tiny_checkpoints):
    model_dir = str(tiny_checkpoints["llama"])
    res = subprocess.run([FUSEC, "autotune", "--model", model_dir, "--device", "cpu", "--max-tokens", "6",
                          "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "GEMV plan ms" in res.stdout and "crossover:" in res.stdout
    path = Path(res.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    stored = json.loads(path.read_text())
    (entry,) = stored["models"].values()
    assert set(entry["crossover_ms"]) <= {"1", "2", "3", "4", "6"}
    lost = [int(t) for t, (gemv, gemm) in entry["crossover_ms"].items() if gemv > gemm]
    if lost:  # the largest T before the first the GEMMs won
        assert lost == [max(int(t) for t in entry["crossover_ms"])]
        assert entry["crossover"] == max([1] + [c for c in CROSSOVER_CANDIDATES if c < lost[0]])
    else:  # the GEMV plan won every T tried: the host's default stands
        assert set(entry["crossover_ms"]) == {"1", "2", "3", "4", "6"}
        assert entry["crossover"] == HOST_CROSSOVER
    model = load_model(model_dir)
    device = HostDevice()
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=8), device, max_model_len=64)
    assert runner.executor.options.crossover == entry["crossover"]
    assert TuningStore().get(runner.device.identity(), model_key(model)).crossover == entry["crossover"]
    runner.close()
    device.close()


def test_autotune_gemm_algorithms_on_the_cuda_path(tiny_checkpoints, monkeypatch):
    from host_cuda import HostMemoryCuda

    # the command makes its own device: it gets the double
    monkeypatch.setattr("fusec.runtime.device.cuda_available", lambda: True)
    monkeypatch.setattr("fusec.runtime.backends.cuda.CudaDevice", HostMemoryCuda)
    model_dir = str(tiny_checkpoints["qwen2"])
    res = CliRunner().invoke(autotune_cmd, ["--model", model_dir, "--device", "cuda", "--max-tokens", "4",
                                            "--repeats", "1", "--gemm-m", "16,32", "--max-algos", "2"])
    assert res.exit_code == 0, res.output
    assert "default ms" in res.output and "16 x " in res.output and "32 x " in res.output
    model = load_model(model_dir, device="cuda")  # auto dtype as the command chose it: f16 on a GPU
    assert model.dtype.value == "f16"
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=8, enforce_eager=True), HostMemoryCuda(), max_model_len=64)
    tuned = runner.executor.gemm.tuned
    # every GEMM of the model's GEMM plan, at both row counts, has a stored algorithm
    assert tuned and {s.tokens for s in tuned} == {16, 32}
    assert all(len(algo) == 64 for algo in tuned.values())
    runner.close()
