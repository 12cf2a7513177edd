"""`fusec bench`: the direct-engine benchmark (no HTTP)."""
from __future__ import annotations

import json
from pathlib import Path

import click
from tqdm import tqdm

from fusec.errors import FusecError
from fusec.runtime.config import EngineConfig, engine_options


def _levels(value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of positive integers, e.g. 1,8,32") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("a comma-separated list of positive integers, e.g. 1,8,32")
    return levels


def _label(r) -> str:
    return f"{r.n}+js" if r.structured else str(r.n)


@click.command("bench")
@engine_options("model", "dtype", "quantization", "load_format", "device", "executor", "max_num_seqs", "max_num_batched_tokens",
                "max_model_len", "block_size", "kv_cache_dtype", "kv_cache_gb", "num_kv_blocks",
                "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager", "crossover", "int8_activations", "seed", max_num_seqs=None)
@click.option("--n", "levels", default="1,8,32", show_default=True, callback=lambda c, p, v: _levels(v),
              help="Concurrency levels (requests in flight), comma-separated.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None, help="Requests per level [default: N].")
@click.option("--input-len", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--output-len", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True)
@click.option("--profile", is_flag=True, help="Also print where each step's time goes (host overhead per N).")
@click.option("--structured", is_flag=True,
              help="Run each level again with a JSON-schema constraint on every request, and compare.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def bench_cmd(levels: list[int], num_prompts: int | None, input_len: int, output_len: int, ignore_eos: bool,
              profile: bool, structured: bool, json_path: Path | None, plot_path: Path | None, **options) -> None:
    """Throughput and latency of the engine at each concurrency level (--max-num-seqs
    defaults to the largest N, --max-model-len to input + output + 16; --seed seeds the
    dummy weights and the random prompts)."""
    from fusec.fusion.traffic import describe
    from fusec.runtime.benchmark import benchmark, plot

    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FusecError("--plot needs matplotlib: pip install 'fusec[bench]'") from None
    max_num_seqs = options["max_num_seqs"] or max(levels)
    if max(levels) > max_num_seqs:
        raise FusecError(f"--n {max(levels)} exceeds --max-num-seqs {max_num_seqs}")
    config = EngineConfig.from_options(options, max_num_seqs=max_num_seqs,
                                       max_model_len=options["max_model_len"] or input_len + output_len + 16)
    seed = config.seed

    def bar(n: int, total: int):
        return tqdm(total=total, desc=f"N={n}", unit="tok", leave=False, disable=None)

    report = benchmark(config, levels, input_len, output_len, num_prompts, ignore_eos, seed, bar, structured)
    click.echo(f"{report.model} ({report.dtype} activations{report.activations_note}, weights {report.weights}, "
               f"KV cache {report.kv_dtype}, {report.executor}); startup {report.startup_s:.2f}s; "
               f"input {input_len}, output {output_len} tokens")
    if report.weights_total_bytes:
        click.echo(f"a decode step of one sequence reads {describe(report.weights_read_bytes, report.weights_total_bytes)}")
    click.echo(f"{'N':>6} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} {'RSS MB':>7}"
               + ("   (+js: every request under a JSON schema)" if structured else ""))
    for r in report.results:
        click.echo(f"{_label(r):>6} {r.output_tok_s:>9.1f} {r.ttft_p50_ms:>7.0f}ms {r.ttft_p95_ms:>7.0f}ms "
                   f"{r.itl_p50_ms:>6.1f}ms {r.itl_p95_ms:>6.1f}ms {r.peak_rss_mb:>7.0f}")
    if structured:
        free = {r.n: r for r in report.results if not r.structured}
        for r in report.results:
            if r.structured:
                click.echo(f"N={r.n}: constrained / free output tok/s = {r.output_tok_s / free[r.n].output_tok_s:.2f}x")
    if profile:
        from fusec.runtime.profile import HOST_PHASES, PHASES

        click.echo("per step (ms): " + ", ".join(PHASES) + "; host = " + " + ".join(HOST_PHASES))
        click.echo(f"{'N':>6} {'step':>8} " + " ".join(f"{p[:8]:>8}" for p in PHASES) + f" {'host ms':>8} {'host %':>7}")
        for r in report.results:
            p = r.profile
            click.echo(f"{_label(r):>6} {p['step_ms']:>8.2f} " + " ".join(f"{p[ph + '_ms']:>8.2f}" for ph in PHASES)
                       + f" {p['host_ms']:>8.2f} {100 * p['host_share']:>6.1f}%")
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2))
        click.echo(f"wrote {json_path}")
    if plot_path is not None:
        plot(report, str(plot_path))
        click.echo(f"wrote {plot_path}")
