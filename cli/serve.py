"""`fusec serve`: the OpenAI-compatible server, with `vllm serve`'s flags."""
from __future__ import annotations

import json
import logging
import signal
import socket
import ssl

import click

from fusec.errors import FusecError
from fusec.runtime.config import EngineConfig, engine_options
from fusec.runtime.server.tool_parsers import TOOL_PARSERS

log = logging.getLogger("fusec.server")

# the engine flags of `serve` (and of `run-batch`, which runs the same server offline)
SERVE_ENGINE_FIELDS = ("model", "tokenizer", "chat_template", "generation_config", "override_generation_config",
                       "dtype", "quantization", "load_format", "seed", "device", "max_model_len", "max_num_seqs",
                       "max_num_batched_tokens",
                       "enable_chunked_prefill", "block_size", "kv_cache_dtype", "kv_cache_gb", "num_kv_blocks",
                       "swap_space", "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager",
                       "max_logprobs", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                       "trust_remote_code", "crossover", "int8_activations")
LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]
# options that take one or more values, as argparse's nargs="+" in vLLM
MULTI_VALUE_OPTIONS = ("--served-model-name", "--api-key")


class ServeCommand(click.Command):
    """click has no nargs="+" options: `--served-model-name a b` becomes
    `--served-model-name a --served-model-name b` (values run up to the next option)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        taking: str | None = None
        for arg in args:
            if arg.startswith("-"):
                taking = arg if arg in MULTI_VALUE_OPTIONS else None
                if taking is None:
                    out.append(arg)
            elif taking is not None:
                out += [taking, arg]
            else:
                out.append(arg)
        return super().parse_args(ctx, out)


def _json_list(value: str | list[str]) -> list[str]:
    """vLLM's --allowed-origins / -methods / -headers: a JSON list of strings."""
    if isinstance(value, list):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise click.BadParameter(f"{value!r} is not a JSON list of strings, e.g. '[\"http://localhost:3000\"]'")
    return parsed


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is found in
    milliseconds, not after a minute of loading (vLLM does the same)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FusecError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _kernels_note(engine) -> str:
    """Startup's kernel-cache use: after `fusec compile` with the same flags, no misses."""
    device = engine.runner.device
    if device is None:
        return ""
    stats = device.cache.stats
    corrupt = f" ({stats.corrupt} corrupt entries rebuilt)" if stats.corrupt else ""
    return f", kernels: {stats.hits} cache hits, {stats.misses} misses{corrupt}"


def _graphs_note(engine) -> str:
    runner = engine.runner
    if not runner.graph_buckets:
        return ""
    return f", decode graphs for batches {runner.graph_buckets} captured in {runner.capture_s:.1f}s"


@click.command("serve", cls=ServeCommand)
@click.argument("model_tag", required=False)
@engine_options(*SERVE_ENGINE_FIELDS)
@click.option("--host", default=None, help="Address to listen on [default: all interfaces (0.0.0.0), as vLLM]")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--served-model-name", "served_names", multiple=True,
              help="Name(s) clients use: `--served-model-name a b`; the first is reported [default: the model]")
@click.option("--api-key", "api_keys", multiple=True, envvar=["FUSEC_API_KEY", "VLLM_API_KEY"],
              help="Require 'Authorization: Bearer KEY' (`--api-key k1 k2`: any of them).")
@click.option("--disable-log-requests/--no-disable-log-requests", default=False,
              help="No log line per request (and no access log).")
@click.option("--enable-log-requests/--no-enable-log-requests", default=False,
              help="Accepted for vLLM 0.11 launch lines: fusec logs request lines unless --disable-log-requests.")
@click.option("--disable-uvicorn-access-log/--no-disable-uvicorn-access-log", default=False,
              help="No uvicorn access-log line per HTTP request.")
@click.option("--disable-fastapi-docs/--no-disable-fastapi-docs", default=False,
              help="No /docs, /redoc or /openapi.json.")
@click.option("--disable-log-stats/--no-disable-log-stats", default=False,
              help="No periodic throughput / cache stats line.")
@click.option("--enable-auto-tool-choice/--no-enable-auto-tool-choice", default=False,
              help="Let the model decide when to call tools (tool_choice \"auto\"); needs --tool-call-parser.")
@click.option("--tool-call-parser", type=click.Choice(sorted(TOOL_PARSERS)), default=None,
              help="How tool calls are read from the model's text under tool_choice \"auto\".")
@click.option("--allowed-origins", default='["*"]', show_default=True, callback=lambda c, p, v: _json_list(v),
              help="CORS: origins browsers may call from (a JSON list).")
@click.option("--allowed-methods", default='["*"]', show_default=True, callback=lambda c, p, v: _json_list(v),
              help="CORS: allowed methods (a JSON list).")
@click.option("--allowed-headers", default='["*"]', show_default=True, callback=lambda c, p, v: _json_list(v),
              help="CORS: allowed request headers (a JSON list).")
@click.option("--allow-credentials/--no-allow-credentials", default=False,
              help="CORS: allow cookies and auth headers cross-origin.")
@click.option("--root-path", default="", help="The path prefix a proxy serves the API under (ASGI root_path).")
@click.option("--max-request-bytes", default=16 * 1024 * 1024, show_default=True, type=click.IntRange(min=1),
              help="Refuse a request body larger than this with 413, while it arrives (fusec's own; vLLM has none).")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM / SIGINT, seconds running requests may go on; then (or at a second signal) each "
                   "ends with finish_reason \"abort\" (fusec's own).")
@click.option("--ssl-keyfile", default=None, type=click.Path(exists=True, dir_okay=False), help="TLS private key.")
@click.option("--ssl-certfile", default=None, type=click.Path(exists=True, dir_okay=False), help="TLS certificate.")
@click.option("--ssl-ca-certs", default=None, type=click.Path(exists=True, dir_okay=False),
              help="CA certificates for client certificates.")
@click.option("--ssl-cert-reqs", default=int(ssl.CERT_NONE), show_default=True, type=click.IntRange(0, 2),
              help="Client certificates: 0 none, 1 optional, 2 required.")
@click.option("--uvicorn-log-level", default="info", show_default=True, type=click.Choice(LOG_LEVELS),
              help="uvicorn's log level (access log included).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(LOG_LEVELS[:-1]),
              help="fusec's log level.")
def serve_cmd(model_tag: str | None, host: str | None, port: int, served_names: tuple[str, ...],
              api_keys: tuple[str, ...], disable_log_requests: bool, enable_log_requests: bool,
              disable_uvicorn_access_log: bool, disable_fastapi_docs: bool, disable_log_stats: bool,
              enable_auto_tool_choice: bool, tool_call_parser: str | None, allowed_origins: list[str],
              allowed_methods: list[str], allowed_headers: list[str], allow_credentials: bool, root_path: str,
              max_request_bytes: int, shutdown_timeout: float, ssl_keyfile: str | None, ssl_certfile: str | None,
              ssl_ca_certs: str | None, ssl_cert_reqs: int, uvicorn_log_level: str, log_level: str, **options) -> None:
    """Serve a model over the OpenAI API (`fusec serve [MODEL]`, like `vllm serve`)."""
    if enable_auto_tool_choice and tool_call_parser is None:
        raise click.UsageError("--enable-auto-tool-choice needs --tool-call-parser")
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise click.UsageError("TLS needs both --ssl-keyfile and --ssl-certfile")
    if ssl_certfile is None and (ssl_ca_certs is not None or ssl_cert_reqs):
        raise click.UsageError("--ssl-ca-certs and --ssl-cert-reqs need TLS (--ssl-keyfile and --ssl-certfile)")
    model = options["model"]
    if model_tag and model and model_tag != model:
        raise FusecError("give the model once: as the argument or as --model")
    model = model or model_tag
    logging.getLogger("fusec").setLevel(log_level.upper())
    config = EngineConfig.from_options(options, model=model)  # bad flag values fail here, before any loading
    host = host or "0.0.0.0"  # vLLM's default: all interfaces
    sock = bind_socket(host, port)
    with sock:
        import uvicorn

        from fusec.runtime.async_engine import AsyncEngine
        from fusec.runtime.engine import LLMEngine
        from fusec.runtime.server.app import ServerSettings, create_app
        from fusec.runtime.server.shutdown import DrainingServer

        engine = LLMEngine(config)
        names = list(served_names) or [model or engine.model.name]
        app = create_app(AsyncEngine(engine), ServerSettings(
            names, model_path=str(engine.model.path), api_keys=list(api_keys), docs=not disable_fastapi_docs,
            disable_log_requests=disable_log_requests, disable_log_stats=disable_log_stats,
            tool_call_parser=tool_call_parser if enable_auto_tool_choice else None,
            allowed_origins=allowed_origins, allowed_methods=allowed_methods, allowed_headers=allowed_headers,
            allow_credentials=allow_credentials, max_request_bytes=max_request_bytes))
        server = DrainingServer(uvicorn.Config(
            app, log_level=uvicorn_log_level,
            access_log=not (disable_log_requests or disable_uvicorn_access_log), root_path=root_path,
            ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, ssl_ca_certs=ssl_ca_certs, ssl_cert_reqs=ssl_cert_reqs),
            app.state.engine, drain_s=shutdown_timeout)
        scheme = "https" if ssl_certfile else "http"
        click.echo(f"fusec serving {names[0]} ({engine.model.config.architecture}, {engine.model.dtype.value} "
                   f"activations{engine.runner.activations_note}, weights {engine.model.weight_types()}, "
                   f"{engine.device} backend, fused plans, {engine.blocks.num_blocks} KV blocks of "
                   f"{engine.runner.kv_dtype.value}, max_model_len {engine.max_model_len}{_graphs_note(engine)}"
                   f"{_kernels_note(engine)}) on "
                   f"{scheme}://{host}:{port}{root_path}/v1", err=True)
        # uvicorn drains on SIGINT / SIGTERM, then re-raises the signal to the handler it found:
        # make that a no-op so the process finishes its own shutdown and exits 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        try:
            server.run(sockets=[sock])  # SIGINT / SIGTERM: stop accepting, drain (shutdown.py), exit
        finally:
            app.state.engine.shutdown()
            click.echo("fusec server stopped", err=True)
