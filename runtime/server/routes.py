"""The HTTP routes: thin handlers that parse the body and hand over to the serving
objects on `app.state` (the API key is checked before the body is read, in limits.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fusec import __version__
from fusec.runtime.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                           CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                                           EmbeddingRequest, EmbeddingResponse, ModelCard, ModelList,
                                           TokenizeRequest, TokenizeResponse, VersionResponse)


router = APIRouter()


@router.get("/health")
async def health() -> Response:
    return Response(status_code=200)


@router.get("/version")
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return PlainTextResponse(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    return request.app.state.serving_models.list()


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> ModelCard:
    return request.app.state.serving_models.card(model_id)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await request.app.state.serving_tokenization.tokenize(req)


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await request.app.state.serving_tokenization.detokenize(req)


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(req: CompletionRequest, request: Request) -> Response | CompletionResponse:
    return await request.app.state.serving_completion.create(req, request)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat(req: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    return await request.app.state.serving_chat.create(req, request)


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    return await request.app.state.serving_embedding.create(req)

