"""`fusec bench`: the direct-engine benchmark (no HTTP)."""
from __future__ import annotations

import json
from pathlib import Path

import click
from tqdm import tqdm

from fusec.cli.options import device_option, model_options
from fusec.errors import FusecError


def _levels(value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of positive integers, e.g. 1,8,32") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("a comma-separated list of positive integers, e.g. 1,8,32")
    return levels


@click.command("bench")
@model_options
@click.option("--n", "levels", default="1,8,32", show_default=True, callback=lambda c, p, v: _levels(v),
              help="Concurrency levels (requests in flight), comma-separated.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None, help="Requests per level [default: N].")
@click.option("--input-len", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--output-len", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True)
@click.option("--executor", default="fused", show_default=True, type=click.Choice(["fused", "reference"]))
@click.option("--max-num-seqs", default=None, type=click.IntRange(min=1), help="[default: the largest N]")
@click.option("--max-num-batched-tokens", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--gpu-memory-utilization", default=0.9, show_default=True, type=click.FloatRange(0.05, 1.0),
              help="GPU memory share for weights, activations and KV cache (CUDA backend).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--enforce-eager", is_flag=True, help="No CUDA graphs (CUDA backend).")
@click.option("--profile", is_flag=True, help="Also print where each step's time goes (host overhead per N).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@device_option
def bench_cmd(model, dtype, load_format, levels, num_prompts, input_len, output_len, ignore_eos, executor,
              max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, seed, enforce_eager, profile, json_path, plot_path, device) -> None:
    """Throughput and latency of the engine at each concurrency level."""
    from fusec.runtime.benchmark import benchmark, plot
    from fusec.runtime.engine import EngineConfig

    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FusecError("--plot needs matplotlib: pip install 'fusec[bench]'") from None
    max_num_seqs = max_num_seqs or max(levels)
    if max(levels) > max_num_seqs:
        raise FusecError(f"--n {max(levels)} exceeds --max-num-seqs {max_num_seqs}")
    config = EngineConfig(model=model, dtype=dtype, load_format=load_format, executor=executor, seed=seed,
                          device=device if executor == "fused" else "cpu",
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                          max_model_len=input_len + output_len + 16)

    def bar(n: int, total: int):
        return tqdm(total=total, desc=f"N={n}", unit="tok", leave=False, disable=None)

    report = benchmark(config, levels, input_len, output_len, num_prompts, ignore_eos, seed, bar)
    click.echo(f"{report.model} ({report.dtype}, {report.executor}); startup {report.startup_s:.2f}s; "
               f"input {input_len}, output {output_len} tokens")
    click.echo(f"{'N':>4} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} {'RSS MB':>7}")
    for r in report.results:
        click.echo(f"{r.n:>4} {r.output_tok_s:>9.1f} {r.ttft_p50_ms:>7.0f}ms {r.ttft_p95_ms:>7.0f}ms "
                   f"{r.itl_p50_ms:>6.1f}ms {r.itl_p95_ms:>6.1f}ms {r.peak_rss_mb:>7.0f}")
    if profile:
        from fusec.runtime.profile import PHASES

        click.echo("per step (ms): " + ", ".join(PHASES) + "; host = schedule + prepare + postprocess")
        click.echo(f"{'N':>4} {'step':>8} " + " ".join(f"{p[:8]:>8}" for p in PHASES) + f" {'host %':>7}")
        for r in report.results:
            p = r.profile
            click.echo(f"{r.n:>4} {p['step_ms']:>8.2f} " + " ".join(f"{p[ph + '_ms']:>8.2f}" for ph in PHASES)
                       + f" {100 * p['host_share']:>6.1f}%")
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2))
        click.echo(f"wrote {json_path}")
    if plot_path is not None:
        plot(report, str(plot_path))
        click.echo(f"wrote {plot_path}")
