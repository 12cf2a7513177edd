"""`fusec autotune`: measure this device's GEMV/GEMM crossover (and, on a GPU, the best
cuBLASLt algorithm per GEMM shape) for a model, and store them for the engine."""
from __future__ import annotations

import click
from tqdm import tqdm

from fusec.runtime.config import EngineConfig, engine_options


def _buckets(value: str) -> list[int]:
    try:
        out = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        out = []
    if not out or out[0] < 1:
        raise click.BadParameter("a comma-separated list of positive integers, e.g. 16,32,64")
    return out


@click.command("autotune")
@engine_options("model", "dtype", "quantization", "load_format", "device")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Largest decode batch tried for the crossover.")
@click.option("--gemm-m", "gemm_m", default="16,32,64,128,256,1024", show_default=True,
              callback=lambda c, p, v: _buckets(v), help="GEMM rows (batch tokens) to tune cuBLASLt for (GPU).")
@click.option("--max-algos", default=32, show_default=True, type=click.IntRange(1, 64),
              help="cuBLASLt algorithms timed per GEMM shape (GPU).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1))
def autotune_cmd(max_tokens: int, gemm_m: list[int], max_algos: int, repeats: int, **options) -> None:
    """Tune the engine's per-device choices for a model; later runs use them."""
    from fusec.models.loader import load_model
    from fusec.runtime.autotune import (Tuning, TuningStore, crossover_candidates, gemm_key, model_key,
                                        tune_crossover, tune_gemms)
    from fusec.runtime.device import make_device, resolve_device
    from fusec.runtime.model_runner import ModelRunner

    kind = resolve_device(options["device"])
    m = load_model(options["model"], dtype=options["dtype"], load_format=options["load_format"], device=kind,
                   quantization=options["quantization"], int8_bands=EngineConfig().int8_dots(kind))
    context = 64
    block_size = 16
    # graphs would fix each batch's plan: eager steps
    config = EngineConfig(block_size=block_size, num_kv_blocks=max_tokens * -(-(context + 1) // block_size) + 1,
                          max_num_seqs=max_tokens, max_num_batched_tokens=max(max_tokens, *gemm_m),
                          enforce_eager=True)
    device = make_device(kind)
    runner = ModelRunner(m, config, device, max_model_len=context + 2)
    label = f"{m.name} ({m.dtype.value}) on {runner.device.identity()}"
    click.echo(f"autotuning {label}")
    with tqdm(total=len(crossover_candidates(max_tokens)), desc="crossover", unit="T", disable=None, leave=False) as bar:
        crossover, timings = tune_crossover(runner, max_tokens, repeats, context, bar.update)
    click.echo(f"{'T':>5} {'GEMV plan ms':>13} {'GEMM plan ms':>13}  faster")
    for t, (gemv, gemm) in timings.items():
        click.echo(f"{t:>5} {gemv:>13.3f} {gemm:>13.3f}  {'GEMV' if gemv <= gemm else 'GEMM'}")
    kept = all(gemv <= gemm for gemv, gemm in timings.values())
    click.echo(f"crossover: batches of up to {crossover} tokens run the fused-GEMV plan"
               + (" (it won at every batch tried: the device's default stands)" if kept else ""))
    tuning = Tuning(crossover, timings)
    library = runner.executor.gemm if device.kind == "cuda" else None  # algorithms to choose: cuBLASLt's
    if library is not None:
        from fusec.runtime.device import GemmShape

        plan = runner.executor.plans["gemm"]
        graph = runner.executor.graph
        shapes = []
        for launch in plan.launches:
            if launch.kind != "gemm":
                continue
            x, w = (graph.node(a.name) for a in launch.args)
            y = graph.node(launch.outputs[0])
            n, k = w.type.shape
            shapes += [GemmShape(rows, n, k, x.type.dtype, y.type.dtype) for rows in gemm_m]
        shapes = list(dict.fromkeys(shapes))
        with tqdm(total=len(shapes), desc="cuBLASLt", unit="shape", disable=None, leave=False) as bar:
            results = tune_gemms(runner.device, library, shapes, max_algos=max_algos, progress=bar.update)
        click.echo(f"{'GEMM (M x N x K, dtype)':<34} {'default ms':>11} {'best ms':>9} {'gain':>6}")
        for shape in shapes:
            key = gemm_key(shape)
            if key not in results:
                continue
            default, best, algo = results[key]
            tuning.gemm_algos[key] = algo
            name = f"{shape.tokens} x {shape.out_features} x {shape.in_features}, {shape.dtype.value}"
            click.echo(f"{name:<34} {default:>11.4f} {best:>9.4f} {default / best if best else 1:>5.2f}x")
    path = TuningStore(device.cache.root).put(runner.device.identity(), model_key(m), tuning, label)
    runner.close()
    device.close()
    click.echo(f"wrote {path}")
