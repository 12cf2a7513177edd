"""`fusec serve`: the OpenAI-compatible server, with vLLM's common flags."""
from __future__ import annotations

import logging
import signal

import click

from fusec.errors import FusecError
from fusec.runtime.config import EngineConfig, engine_options
from fusec.runtime.server.tool_parsers import TOOL_PARSERS

log = logging.getLogger("fusec.server")


def _kernels_note(engine) -> str:
    """Startup's kernel-cache use: after `fusec compile` with the same flags, no misses."""
    device = engine.runner.device
    if device is None:
        return ""
    stats = device.cache.stats
    return f", kernels: {stats.hits} cache hits, {stats.misses} misses"


def _graphs_note(engine) -> str:
    runner = engine.runner
    if not runner.graph_buckets:
        return ""
    return f", decode graphs for batches {runner.graph_buckets} captured in {runner.capture_s:.1f}s"


@click.command("serve")
@click.argument("model_tag", required=False)
@engine_options("model", "dtype", "quantization", "load_format", "seed", "device", "max_model_len", "max_num_seqs",
                "max_num_batched_tokens", "block_size", "kv_cache_gb", "num_kv_blocks", "gpu_memory_utilization",
                "enable_prefix_caching", "enforce_eager", "crossover")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--served-model-name", "served_names", multiple=True, help="Name(s) clients use [default: the model]")
@click.option("--api-key", default=None, envvar="FUSEC_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--disable-log-requests", is_flag=True)
@click.option("--enable-auto-tool-choice", is_flag=True,
              help="Let the model decide when to call tools (tool_choice \"auto\"); needs --tool-call-parser.")
@click.option("--tool-call-parser", type=click.Choice(sorted(TOOL_PARSERS)), default=None,
              help="How tool calls are read from the model's text under tool_choice \"auto\".")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error", "critical"]))
def serve_cmd(model_tag: str | None, host: str, port: int, served_names: tuple[str, ...], api_key: str | None,
              disable_log_requests: bool, enable_auto_tool_choice: bool, tool_call_parser: str | None,
              log_level: str, **options) -> None:
    """Serve a model over the OpenAI API (`fusec serve [MODEL]`, like `vllm serve`)."""
    if enable_auto_tool_choice and tool_call_parser is None:
        raise click.UsageError("--enable-auto-tool-choice needs --tool-call-parser")
    import uvicorn

    from fusec.runtime.async_engine import AsyncEngine
    from fusec.runtime.engine import LLMEngine
    from fusec.runtime.server.app import ServerSettings, create_app

    model = options["model"]
    if model_tag and model and model_tag != model:
        raise FusecError("give the model once: as the argument or as --model")
    model = model or model_tag
    engine = LLMEngine(EngineConfig.from_options(options, model=model))
    names = list(served_names) or [model or engine.model.name]
    app = create_app(AsyncEngine(engine), ServerSettings(
        names, api_key, disable_log_requests, str(engine.model.path),
        tool_call_parser=tool_call_parser if enable_auto_tool_choice else None))
    logging.getLogger("fusec").setLevel(log_level.upper())
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                            access_log=not disable_log_requests)
    server = uvicorn.Server(config)
    click.echo(f"fusec serving {names[0]} ({engine.model.config.architecture}, {engine.model.dtype.value} "
               f"activations, weights {engine.model.weight_types()}, "
               f"{engine.device} backend, fused plans, {engine.blocks.num_blocks} KV blocks, max_model_len "
               f"{engine.max_model_len}{_graphs_note(engine)}{_kernels_note(engine)}) on http://{host}:{port}/v1",
               err=True)
    # uvicorn drains on SIGINT / SIGTERM, then re-raises the signal to the handler it found:
    # make that a no-op so the process finishes its own shutdown and exits 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()  # SIGINT / SIGTERM: stop accepting, let in-flight requests finish, exit
    finally:
        app.state.engine.shutdown()
        click.echo("fusec server stopped", err=True)
