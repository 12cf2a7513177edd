"""`fusec serve`: the OpenAI-compatible server, with vLLM's common flags."""
from __future__ import annotations

import logging
import signal

import click

from fusec.cli.options import DTYPE_CHOICES
from fusec.errors import FusecError

log = logging.getLogger("fusec.server")


def _graphs_note(engine) -> str:
    runner = engine.runner
    if not runner.graph_buckets:
        return ""
    return f", CUDA graphs for batches {runner.graph_buckets} captured in {runner.capture_s:.1f}s"


@click.command("serve")
@click.argument("model_tag", required=False)
@click.option("--model", default=None, help="HF directory, .gguf file, or directory with one .gguf [default: SmolLM2]")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--served-model-name", "served_names", multiple=True, help="Name(s) clients use [default: the model]")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES))
@click.option("--max-model-len", default=None, type=click.IntRange(min=1))
@click.option("--max-num-seqs", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-num-batched-tokens", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--gpu-memory-utilization", default=0.9, show_default=True, type=click.FloatRange(0.05, 1.0),
              help="GPU memory share for weights and KV cache (CUDA backend).")
@click.option("--kv-cache-gb", default=1.0, show_default=True, type=click.FloatRange(min=0.01),
              help="KV-cache memory on the CPU backend.")
@click.option("--api-key", default=None, envvar="FUSEC_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--load-format", default="auto", show_default=True,
              type=click.Choice(["auto", "safetensors", "gguf", "dummy"]))
@click.option("--enforce-eager", is_flag=True, help="Run every step eagerly: no CUDA graphs (CUDA backend).")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--disable-log-requests", is_flag=True)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error", "critical"]))
def serve_cmd(model_tag, model, host, port, served_names, dtype, max_model_len, max_num_seqs, max_num_batched_tokens,
              gpu_memory_utilization, kv_cache_gb, api_key, seed, load_format, enforce_eager, enable_prefix_caching,
              device, disable_log_requests, log_level) -> None:
    """Serve a model over the OpenAI API (`fusec serve [MODEL]`, like `vllm serve`)."""
    import uvicorn

    from fusec.runtime.async_engine import AsyncEngine
    from fusec.runtime.engine import EngineConfig, LLMEngine
    from fusec.runtime.server.app import ServerSettings, create_app

    if model_tag and model and model_tag != model:
        raise FusecError("give the model once: as the argument or as --model")
    model = model or model_tag
    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, load_format=load_format, seed=seed, device=device,
                                    max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_num_batched_tokens, kv_cache_gb=kv_cache_gb,
                                    enable_prefix_caching=enable_prefix_caching,
                                    gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager))
    names = list(served_names) or [model or engine.model.name]
    app = create_app(AsyncEngine(engine), ServerSettings(names, api_key, disable_log_requests, str(engine.model.path)))
    logging.getLogger("fusec").setLevel(log_level.upper())
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                            access_log=not disable_log_requests)
    server = uvicorn.Server(config)
    click.echo(f"fusec serving {names[0]} ({engine.model.config.architecture}, {engine.model.dtype.value}, "
               f"{engine.device} backend, fused plans, {engine.blocks.num_blocks} KV blocks, max_model_len "
               f"{engine.max_model_len}{_graphs_note(engine)}) on http://{host}:{port}/v1", err=True)
    # uvicorn drains on SIGINT / SIGTERM, then re-raises the signal to the handler it found:
    # make that a no-op so the process finishes its own shutdown and exits 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()  # SIGINT / SIGTERM: stop accepting, let in-flight requests finish, exit
    finally:
        app.state.engine.shutdown()
        click.echo("fusec server stopped", err=True)
