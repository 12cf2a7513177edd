"""`fusec compile`: build (or find in the cache) every kernel a model's plans need."""
from __future__ import annotations

import time
from pathlib import Path

import click
from tqdm import tqdm

from fusec.errors import FusecError
from fusec.fusion.dtypes import DType
from fusec.runtime.config import EngineConfig, engine_options


def model_kernels(model, target, max_positions: int, block_size: int, kv_dtype: DType | None = None,
                  int8_activations: bool | None = None) -> tuple[dict, list]:
    """A model's plans for a target, as a device of that target runs them (the same
    plan options, the same weight layout), and the distinct kernels serving it needs: the
    plans', the sampler's, the host GEMMs' weight decoders, and (on a GPU) the
    dummy-weight fill."""
    import dataclasses

    from fusec.fusion.plan import build_plans, int8_dots_on
    from fusec.kernels.random import FillRandom
    from fusec.kernels.registry import default_registry
    from fusec.models.loader import with_int8_bands
    from fusec.runtime.device import plan_options
    from fusec.runtime.sampler import KernelSampler

    options = dataclasses.replace(plan_options(target, max_positions, gpu_shapes=target.is_gpu),
                                  int8_activations=int8_activations)
    model = with_int8_bands(model, int8_dots_on(target, int8_activations))
    plans = build_plans(model.graph(block_size, max_positions, kv_dtype), default_registry(), options)
    kernels = [k for plan in plans.values() for k in plan.kernels()]
    kernels += KernelSampler.kernel_specs(model.config.vocab_size)
    if not target.is_gpu:  # the host's GEMMs decode block-quantized and 16-bit weights with a kernel too
        from fusec.runtime.backends.cpu import HostGemm

        graph = plans["gemm"].graph
        weights = [graph.node(launch.args[1].name) for launch in plans["gemm"].launches if launch.kind == "gemm"]
        kernels += [HostGemm.decoder(w.type.shape[1], w.format, w.type.dtype) for w in weights
                    if w.format or w.type.dtype is not DType.F32]
    if target.is_gpu:
        kernels.append(FillRandom(model.dtype))
    return plans, list({k.name: k for k in kernels}.values())


@click.command("compile")
@engine_options("model", "dtype", "quantization", "max_model_len", "block_size", "kv_cache_dtype", "int8_activations")
@click.option("--arch", default="sm_90", show_default=True, type=click.Choice(["sm_80", "sm_90", "host"]),
              help="host: what `serve --device cpu` runs; sm_*: what `serve --device cuda` runs on that GPU.")
@click.option("--explain", is_flag=True, help="Per layer: the unfused ops, the matched patterns, the launches.")
@click.option("--emit-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write each kernel's PTX (or host object) here.")
def compile_cmd(arch: str, explain: bool, emit_dir: Path | None, **options) -> None:
    """Compile the fused kernels of a model for a GPU arch or the host: exactly those
    `fusec serve` with the same flags loads, so its startup finds them all cached."""
    from fusec.fusion.cache import KernelCache
    from fusec.fusion.codegen.target import parse_arch
    from fusec.fusion.compiler import compile_kernel
    from fusec.fusion.explain import report
    from fusec.fusion.traffic import weight_traffic
    from fusec.models.loader import load_model

    config = EngineConfig.from_options(options)
    target = parse_arch(arch)
    m = load_model(config.model, dtype=config.dtype, with_weights=False, device="cuda" if target.is_gpu else "cpu",
                   quantization=config.quantization)
    max_model_len = config.resolved_max_model_len(m.config.max_position_embeddings)
    t0 = time.perf_counter()
    try:
        plans, kernels = model_kernels(m, target, max_model_len, config.block_size, config.kv_dtype(),
                                       config.int8_activations if not target.is_gpu else None)
    except ValueError as e:  # e.g. an op no kernel covers on a GPU target
        raise FusecError(f"cannot compile {m.name} for {arch}: {e}") from None
    t_plan = time.perf_counter() - t0
    click.echo(f"{m.name}: {m.config.architecture}, {m.config.num_layers} layers, {m.dtype.value}, target {arch}")
    for plan in plans.values():
        for line in report(plan, explain):
            click.echo(line)
    traffic = weight_traffic(plans["gemv"], m.weight_bytes(), tokens=1)
    click.echo(f"a decode step of one sequence reads {traffic.describe()}")
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
