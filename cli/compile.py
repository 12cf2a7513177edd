"""`fusec compile`: build (or find in the cache) every kernel a model's plans need."""
from __future__ import annotations

import time
from pathlib import Path

import click
from tqdm import tqdm

from fusec.cli.options import DTYPE_CHOICES, model_option
from fusec.errors import FusecError


def model_kernels(model, target, crossover: int, block_size: int = 16) -> tuple[dict, list]:
    """A model's plans for a target, and the distinct kernels serving it needs: the
    plans', the sampler's, and (on a GPU) the dummy-weight fill."""
    from fusec.fusion.plan import PlanOptions, build_plans
    from fusec.kernels.random import FillRandom
    from fusec.kernels.registry import default_registry
    from fusec.runtime.sampler import KernelSampler

    options = PlanOptions(target, model.config.max_position_embeddings, crossover)
    plans = build_plans(model.graph(block_size), default_registry(), options)
    kernels = [k for plan in plans.values() for k in plan.kernels()]
    kernels += KernelSampler.kernel_specs(model.config.vocab_size)
    if target.is_gpu:
        kernels.append(FillRandom(model.dtype))
    return plans, list({k.name: k for k in kernels}.values())


@click.command("compile")
@model_option
@click.option("--arch", default="sm_90", show_default=True, type=click.Choice(["sm_80", "sm_90", "host"]))
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES),
              help="auto: f16 for GPUs, f32 for the host")
@click.option("--block-size", default=16, show_default=True, type=click.IntRange(min=1), help="KV cache block size")
@click.option("--crossover", default=8, show_default=True, type=click.IntRange(min=1),
              help="largest batch (tokens) served by the fused-GEMV plan")
@click.option("--explain", is_flag=True, help="Per layer: the unfused ops, the matched patterns, the launches.")
@click.option("--emit-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write each kernel's PTX (or host object) here.")
def compile_cmd(model: str | None, arch: str, dtype: str, block_size: int, crossover: int, explain: bool,
                emit_dir: Path | None) -> None:
    """Compile the fused kernels of a model for a GPU arch or the host."""
    from fusec.fusion.cache import KernelCache
    from fusec.fusion.codegen.target import parse_arch
    from fusec.fusion.compiler import compile_kernel
    from fusec.fusion.explain import report
    from fusec.models.loader import load_model

    target = parse_arch(arch)
    if dtype == "auto":
        dtype = "f16" if target.is_gpu else "f32"
    m = load_model(model, dtype=dtype, with_weights=False)
    t0 = time.perf_counter()
    try:
        plans, kernels = model_kernels(m, target, crossover, block_size)
    except ValueError as e:  # e.g. an op no kernel covers on a GPU target
        raise FusecError(f"cannot compile {m.name} for {arch}: {e}") from None
    t_plan = time.perf_counter() - t0
    click.echo(f"{m.name}: {m.config.architecture}, {m.config.num_layers} layers, {m.dtype.value}, target {arch}")
    for plan in plans.values():
        for line in report(plan, explain):
            click.echo(line)
    cache = KernelCache()
    if emit_dir is not None:
        emit_dir.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    for kernel in tqdm(kernels, desc="compiling kernels", unit="kernel", disable=None, leave=False):
        art = compile_kernel(kernel, target, cache)
        if emit_dir is not None:
            (emit_dir / f"{kernel.name}{art.suffix}").write_bytes(art.data)
    t_compile = time.perf_counter() - t1
    s = cache.stats
    for name in s.miss_names:
        click.echo(f"  compiled  {name}")
    click.echo(f"kernels: {len(kernels)} distinct, {s.hits} cache hits, {s.misses} misses"
               f"{f', {s.corrupt} corrupt entries rebuilt' if s.corrupt else ''}")
    click.echo(f"time: planning {t_plan:.2f}s, kernels {t_compile:.3f}s; cache {cache.root}")
    if emit_dir is not None:
        click.echo(f"wrote {len(kernels)} files to {emit_dir}")
