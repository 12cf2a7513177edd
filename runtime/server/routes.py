"""The HTTP routes: thin handlers that check the key, parse the body and hand over to
the serving objects on `app.state`."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fusec import __version__
from fusec.runtime.server.errors import APIError
from fusec.runtime.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                           CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                                           EmbeddingRequest, EmbeddingResponse, ModelCard, ModelList,
                                           TokenizeRequest, TokenizeResponse, VersionResponse)


async def check_key(request: Request) -> None:
    keys = request.app.state.settings.api_keys
    if keys and request.headers.get("authorization", "") not in {f"Bearer {k}" for k in keys}:
        raise APIError(401, "invalid or missing API key")


router = APIRouter()
authorized = APIRouter(dependencies=[Depends(check_key)])


@router.get("/health")
async def health() -> Response:
    return Response(status_code=200)


@router.get("/version")
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return PlainTextResponse(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@authorized.get("/v1/models")
async def models(request: Request) -> ModelList:
    return request.app.state.serving_models.list()


@authorized.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> ModelCard:
    return request.app.state.serving_models.card(model_id)


@authorized.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await request.app.state.serving_tokenization.tokenize(req)


@authorized.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await request.app.state.serving_tokenization.detokenize(req)


@authorized.post("/v1/completions", response_model=CompletionResponse)
async def completions(req: CompletionRequest, request: Request) -> Response | CompletionResponse:
    return await request.app.state.serving_completion.create(req, request)


@authorized.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat(req: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    return await request.app.state.serving_chat.create(req, request)


@authorized.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    return await request.app.state.serving_embedding.create(req)


router.include_router(authorized)
