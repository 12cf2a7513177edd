"""The `fusec` command group."""
from __future__ import annotations

import logging
import sys

import click

from fusec import __version__
from fusec.cli.autotune import autotune_cmd
from fusec.cli.bench import bench_cmd
from fusec.cli.compile import compile_cmd
from fusec.cli.run_batch import run_batch_cmd
from fusec.cli.serve import serve_cmd
from fusec.errors import FusecError
from fusec.runtime.config import engine_options


class UserError(click.ClickException):
    """A FusecError shown as one line, exit code 2 (like a usage error)."""

    exit_code = 2


class FusecGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FusecError as e:
            raise UserError(str(e)) from None
        except OSError as e:  # an unreadable file, a full disk: the user's to fix, not a crash
            raise UserError(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from None


@click.group(cls=FusecGroup)
@click.version_option(__version__, prog_name="fusec")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def cli(log_level: str) -> None:
    """fusec: a compiler-centric LLM inference engine."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@engine_options("model", "dtype", "quantization", "load_format", "device", "executor", "max_model_len",
                "kv_cache_dtype", "int8_activations")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable).")
@click.option("--chat", is_flag=True, help="Wrap each prompt as a user message in the chat template.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 = greedy")
@click.option("--seed", default=None, type=click.IntRange(min=0), help="Seed for sampling (and dummy weights).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
def generate(prompts: tuple[str, ...], chat: bool, max_tokens: int, temperature: float, seed: int | None,
             ignore_eos: bool, **options) -> None:
    """Generate text for one or more prompts (continuous batching over a paged KV cache)."""
    from fusec.runtime.config import EngineConfig
    from fusec.runtime.llm import LLM
    from fusec.runtime.sequence import SamplingParams

    llm = LLM(config=EngineConfig.from_options(options, seed=seed or 0))
    engine = llm.engine
    tok = engine.tokenizer
    if tok is None:
        raise FusecError(f"{engine.model.path}: no tokenizer found (tokenizer.json or GGUF vocabulary)")
    ids, params = [], []
    for i, p in enumerate(prompts):
        ids.append(tok.encode_chat([{"role": "user", "content": p}]) if chat else tok.encode(p))
        room = engine.max_model_len - len(ids[-1])
        if room < 1:
            raise FusecError(f"prompt {i + 1} has {len(ids[-1])} tokens; the context holds {engine.max_model_len} "
                             f"(prompt plus at least one generated token)")
        params.append(SamplingParams(max_tokens=min(max_tokens, room), temperature=temperature,
                                     ignore_eos=ignore_eos, seed=None if seed is None else seed + i))
    outputs = llm.generate(prompt_token_ids=ids, sampling_params=params)
    engine.close()
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            click.echo(f"=== prompt {i + 1} ===")
        click.echo(out.outputs[0].text)


@cli.command()
def info() -> None:
    """Versions, the default model, and the usable backends."""
    import ctypes.util
    import importlib.metadata
    import platform

    from fusec.models.loader import default_model_path

    click.echo(f"fusec {__version__}  python {platform.python_version()}  {platform.machine()}")
    for dist in ("numpy", "networkx", "tokenizers", "gguf", "jinja2", "llvmlite", "cuda-python", "nvmath-python"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        click.echo(f"  {dist:<14} {version}")
    try:
        click.echo(f"default model: {default_model_path()}")
    except FusecError as e:
        click.echo(f"default model: unavailable ({e})")
    click.echo("backends:")
    click.echo("  reference  yes (numpy interpreter of the unfused graph)")
    click.echo("  host       yes (fused kernels JIT-compiled with llvmlite, numpy GEMMs)")
    from fusec.runtime.device import cuda_available

    arch = None
    if cuda_available():
        from cuda.bindings import driver
        from cuda.core import Device

        from fusec.runtime.backends.cuda import device_target

        dev = Device()
        major, minor = dev.compute_capability
        _, free, total = driver.cuMemGetInfo()
        _, version = driver.cuDriverGetVersion()
        arch = device_target(dev).arch
        click.echo(f"  cuda       yes: {dev.name}, compute capability {major}.{minor}, {total / 2**30:.1f} GiB "
                   f"({free / 2**30:.1f} GiB free), driver CUDA {version // 1000}.{version % 1000 // 10}; "
                   f"kernels target {arch}")
    else:
        driver_lib = ctypes.util.find_library("cuda")
        click.echo(f"  cuda       no ({'no usable device' if driver_lib else 'no NVIDIA driver'}; "
                   f"pip install 'fusec[cuda]' on a GPU machine)")
    _cache_state(["host"] + ([arch] if arch else []))


def _cache_state(arches: list[str]) -> None:
    """How many of the default model's kernels the cache holds per target."""
    from fusec.cli.compile import model_kernels
    from fusec.fusion.cache import KernelCache
    from fusec.fusion.codegen.target import parse_arch
    from fusec.fusion.compiler import is_cached
    from fusec.models.loader import load_model
    from fusec.runtime.config import EngineConfig

    cache = KernelCache()
    click.echo(f"kernel cache: {cache.root}")
    config = EngineConfig()
    for arch in arches:
        target = parse_arch(arch)
        try:
            m = load_model(None, with_weights=False, device="cuda" if target.is_gpu else "cpu")
        except FusecError:
            return
        limit = config.resolved_max_model_len(m.config.max_position_embeddings)
        _plans, kernels = model_kernels(m, target, limit, config.block_size)
        cached = sum(is_cached(k, target, cache) for k in kernels)
        click.echo(f"  {arch:<6} {m.name} ({m.dtype.value}): {cached}/{len(kernels)} kernels cached"
                   f"{'' if cached == len(kernels) else f' (fusec compile --arch {arch} builds them)'}")


cli.add_command(compile_cmd)
cli.add_command(autotune_cmd)
cli.add_command(bench_cmd)
cli.add_command(serve_cmd)
cli.add_command(run_batch_cmd)


def main() -> None:
    cli(prog_name="fusec")


if __name__ == "__main__":
    sys.exit(main())
