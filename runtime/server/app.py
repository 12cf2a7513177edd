"""The FastAPI app: vLLM's OpenAI-compatible endpoints over an AsyncEngine."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI

from fusec import __version__
from fusec.runtime.async_engine import AsyncEngine
from fusec.runtime.server.errors import install_error_handlers
from fusec.runtime.server.metrics import ServerMetrics
from fusec.runtime.server.routes import router
from fusec.runtime.server.serving_chat import OpenAIServingChat
from fusec.runtime.server.serving_completion import OpenAIServingCompletion
from fusec.runtime.server.serving_models import OpenAIServingModels
from fusec.runtime.server.serving_tokenization import OpenAIServingTokenization


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    disable_log_requests: bool = False
    model_path: str = ""
    tool_call_parser: str | None = None  # with --enable-auto-tool-choice: how "auto" reads calls


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="fusec", version=__version__,
                  description="OpenAI-compatible API served by fusec (a drop-in for `vllm serve`).")
    models = OpenAIServingModels(settings.served_model_names, settings.model_path, engine.engine.max_model_len)
    metrics = ServerMetrics(engine, settings.served_model_names[0])
    state = app.state
    state.engine, state.settings, state.metrics, state.serving_models = engine, settings, metrics, models
    state.serving_completion = OpenAIServingCompletion(engine, models, metrics)
    state.serving_chat = OpenAIServingChat(engine, models, metrics, settings.tool_call_parser)
    state.serving_tokenization = OpenAIServingTokenization(engine, models)
    install_error_handlers(app)
    app.include_router(router)
    return app
