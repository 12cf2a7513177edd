"""OpenAI batch files (vLLM's `run-batch`): each line a request to one of the server's
endpoints, answered by the server's own app in process, so validation, errors and
bodies are exactly what `fusec serve` gives; output lines in vLLM's format."""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import httpx
from fastapi import FastAPI
from pydantic import BaseModel, TypeAdapter, ValidationError

from fusec.errors import InputError

# the endpoints a batch line may name, those of them the app serves
BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class BatchRequestInput(BaseModel):
    """One input line (OpenAI's batch request input object)."""

    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


def _hex_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class BatchRequestOutput:
    """One output line. Like vLLM: a 200 carries the body; an error response from the app
    carries its status, no body, and the error body in `error`; a line refused before
    reaching the app (unsupported url or method, streaming) is a 400 with a message."""

    custom_id: str
    status_code: int
    body: Any = None
    error: Any = None
    id: str = field(default_factory=lambda: _hex_id("vllm"))
    request_id: str = field(default_factory=lambda: _hex_id("vllm-batch"))

    @classmethod
    def refused(cls, custom_id: str, message: str) -> BatchRequestOutput:
        return cls(custom_id, 400, error=message)

    @property
    def ok(self) -> bool:
        return self.status_code == 200

    def to_json(self) -> str:
        line = {"id": self.id, "custom_id": self.custom_id,
                "response": {"status_code": self.status_code, "request_id": self.request_id, "body": self.body},
                "error": self.error}
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def parse_batch(lines: Iterable[str], source: str) -> list[BatchRequestInput]:
    """The requests of a batch file (blank lines skipped). A line that is not a request
    object refuses the whole file, as OpenAI's batch validation and vLLM do: it has no
    custom_id to answer under."""
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            requests.append(BatchRequestInput.model_validate_json(line))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputError(f"{source} line {number}: {first['msg']}" + (f" ({where})" if where else "")) from None
    return requests


def served_urls(app: FastAPI) -> list[str]:
    # from the OpenAPI schema: the public view of the routes (included routers stay nested in app.routes)
    posts = {path for path, operations in app.openapi()["paths"].items() if "post" in operations}
    return [url for url in BATCH_URLS if url in posts]


async def run_batch(app: FastAPI, requests: Sequence[BatchRequestInput], max_in_flight: int,
                    on_done: Callable[[BatchRequestOutput], None] = lambda _: None
                    ) -> AsyncIterator[BatchRequestOutput]:
    """Every request's output, in input order. Up to max_in_flight requests are in flight
    at once (started in input order), so the engine batches them; on_done sees each
    output as it completes."""
    urls = served_urls(app)
    limit = asyncio.Semaphore(max_in_flight)
    # not raising app exceptions: an unexpected one is answered by the app's 500 handler
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://fusec-batch", timeout=None) as client:
        async def answer(request: BatchRequestInput) -> BatchRequestOutput:
            async with limit:
                output = await _answer(client, request, urls)
            on_done(output)
            return output

        tasks = [asyncio.create_task(answer(r)) for r in requests]
        try:
            for task in tasks:
                yield await task
        finally:
            for task in tasks:
                task.cancel()


async def _answer(client: httpx.AsyncClient, request: BatchRequestInput, urls: list[str]) -> BatchRequestOutput:
    if request.method != "POST":
        return BatchRequestOutput.refused(request.custom_id, f"method {request.method} was used: batch requests "
                                                             f"are POST")
    if request.url not in urls:
        return BatchRequestOutput.refused(request.custom_id, f"URL {request.url} was used. Supported endpoints: "
                                                             f"{', '.join(urls)}.")
    if _streams(request.body):
        return BatchRequestOutput.refused(request.custom_id, "Request must not be sent in stream mode")
    response = await client.post(request.url, json=request.body)
    try:
        body = response.json()
    except ValueError:  # not a JSON answer: never a batch result
        return BatchRequestOutput(request.custom_id, response.status_code, error=response.text[:1000])
    if response.status_code == 200:
        return BatchRequestOutput(request.custom_id, 200, body=body)
    return BatchRequestOutput(request.custom_id, response.status_code, error=body)


def _streams(body: dict[str, Any]) -> bool:
    """`stream` as the request models read it (1, "true" and "yes" are true too)."""
    try:
        return TypeAdapter(bool).validate_python(body.get("stream", False))
    except ValidationError:
        return False  # the app answers the bad value with a 400
