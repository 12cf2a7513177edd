"""The FastAPI app: vLLM's OpenAI-compatible endpoints over an AsyncEngine."""
from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from fusec import __version__
from fusec.runtime.async_engine import AsyncEngine
from fusec.runtime.server.errors import install_error_handlers
from fusec.runtime.server.limits import RequestLimits
from fusec.runtime.server.metrics import ServerMetrics
from fusec.runtime.server.routes import router
from fusec.runtime.server.serving_chat import OpenAIServingChat
from fusec.runtime.server.serving_completion import OpenAIServingCompletion
from fusec.runtime.server.serving_embedding import OpenAIServingEmbedding
from fusec.runtime.server.serving_models import OpenAIServingModels
from fusec.runtime.server.serving_tokenization import OpenAIServingTokenization
from fusec.runtime.server.stats_logger import StatsLogger


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)  # any of them opens the API; none: no key needed
    disable_log_requests: bool = False
    disable_log_stats: bool = False  # no periodic stats line
    # seconds between stats lines (vLLM's VLLM_LOG_STATS_INTERVAL, here FUSEC_LOG_STATS_INTERVAL)
    log_stats_interval: float = field(default_factory=lambda: float(os.environ.get("FUSEC_LOG_STATS_INTERVAL", 10)))
    model_path: str = ""
    tool_call_parser: str | None = None  # with --enable-auto-tool-choice: how "auto" reads calls
    # CORS, with vLLM's defaults: any origin, method and header; no credentials
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    docs: bool = True  # /docs, /redoc and /openapi.json
    max_request_bytes: int = 16 * 1024 * 1024  # a larger body is refused with 413 while it arrives


@contextlib.asynccontextmanager
async def _background(app: FastAPI) -> AsyncIterator[None]:
    """What runs beside the routes while the server is up: the metrics' step watcher
    and, unless disabled, the periodic stats line."""
    state = app.state
    state.metrics.watch_steps()
    stats = None
    if not state.settings.disable_log_stats:
        stats = asyncio.create_task(StatsLogger(state.engine, state.settings.log_stats_interval).run())
    try:
        yield
    finally:
        if stats is not None:
            stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="fusec", version=__version__, lifespan=_background,
                  description="OpenAI-compatible API served by fusec (a drop-in for `vllm serve`).", **docs)
    models = OpenAIServingModels(settings.served_model_names, settings.model_path, engine.engine.max_model_len)
    metrics = ServerMetrics(engine, settings.served_model_names[0], log_requests=not settings.disable_log_requests)
    state = app.state
    state.engine, state.settings, state.metrics, state.serving_models = engine, settings, metrics, models
    state.serving_completion = OpenAIServingCompletion(engine, models, metrics)
    state.serving_chat = OpenAIServingChat(engine, models, metrics, settings.tool_call_parser)
    state.serving_tokenization = OpenAIServingTokenization(engine, models)
    state.serving_embedding = OpenAIServingEmbedding(engine, models, metrics)
    install_error_handlers(app)
    # the key and body-size checks sit inside CORS, so their 401 / 413 carry its headers
    app.add_middleware(RequestLimits, api_keys=settings.api_keys, max_request_bytes=settings.max_request_bytes)
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                       allow_methods=settings.allowed_methods, allow_headers=settings.allowed_headers,
                       allow_credentials=settings.allow_credentials)
    app.include_router(router)
    return app
