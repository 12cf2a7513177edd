"""`fusec bench` end to end on a tiny model (numbers are benchmarks' business; here
the command, its report and its files)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

FUSEC = str(Path(sys.executable).with_name("fusec"))


def test_bench_reports_levels_and_writes_json_and_plot(tiny_checkpoints, tmp_path):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    res = subprocess.run([FUSEC, "bench", "--model", str(tiny_checkpoints["llama"]), "--n", "1,4", "--input-len", "8",
                          "--output-len", "6", "--json", str(out_json), "--plot", str(out_png), "--profile"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(out_json.read_text())
    assert [r["n"] for r in report["results"]] == [1, 4]
    for r in report["results"]:
        assert r["output_tokens"] == r["num_prompts"] * 6 and r["output_tok_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p95_ms"]
        assert r["peak_rss_mb"] > 0
        # the step profile: phases add up to the step, the model dominates it
        p = r["profile"]
        phases = ["schedule_ms", "prepare_ms", "stage_ms", "forward_ms", "sample_ms", "postprocess_ms"]
        assert abs(sum(p[k] for k in phases) - p["step_ms"]) < 1e-6 and min(p[k] for k in phases) >= 0
        assert p["step_ms"] * 6 <= r["wall_s"] * 1000 * 1.05  # at least 6 steps in the level
        assert 0 < p["host_share"] < 1 and 0 < p["host_ms"] < p["step_ms"]
    assert report["startup_s"] > 0 and report["machine"]["cores"] >= 1
    # a dense model's decode step reads every weight but the embedding rows it does not look up
    assert 0.5 * report["weights_total_bytes"] < report["weights_read_bytes"] < report["weights_total_bytes"]
    assert re.search(r"a decode step of one sequence reads [\d.]+ KiB of [\d.]+ KiB of weights \(\d+%\)", res.stdout)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tok/s" in res.stdout and "TTFT" in res.stdout and "host %" in res.stdout and "host ms" in res.stdout


def test_bench_rejects_bad_levels():
    res = subprocess.run([FUSEC, "bench", "--n", "1,x"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "comma-separated" in res.stderr


def test_bench_structured_runs_each_level_free_and_constrained(tmp_path):
    out_json = tmp_path / "s.json"
    res = subprocess.run([FUSEC, "bench", "--n", "2", "--input-len", "8", "--output-len", "12", "--structured",
                          "--json", str(out_json)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    results = json.loads(out_json.read_text())["results"]
    assert [(r["n"], r["structured"]) for r in results] == [(2, False), (2, True)]
    # the schema asks for more than the output length: constrained requests run to it too
    assert all(r["output_tokens"] == 2 * 12 for r in results)
    assert "2+js" in res.stdout and "constrained / free output tok/s" in res.stdout
