"""The FastAPI app: vLLM's OpenAI-compatible endpoints over an AsyncEngine."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from fusec import __version__
from fusec.errors import FusecError
from fusec.runtime.async_engine import AsyncEngine
from fusec.runtime.outputs import CompletionOutput, RequestOutput
from fusec.runtime.sequence import Logprob, SamplingParams
from fusec.runtime.server.metrics import ServerMetrics
from fusec.runtime.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                           TokenizeRequest)

log = logging.getLogger("fusec.server")


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    disable_log_requests: bool = False
    model_path: str = ""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
               413: "RequestTooLarge", 422: "BadRequestError", 500: "InternalServerError"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


@dataclass
class _Stream:
    """Tracks one sequence's progress for deltas, metrics and usage."""
    text_len: int = 0
    token_count: int = 0
    logprob_count: int = 0
    last_time: float = 0.0
    done: bool = False


@dataclass
class _Job:
    prompt_ids: list[int]
    prompt_text: str | None
    generator: AsyncIterator[RequestOutput]
    first: RequestOutput | None = None
    streams: list[_Stream] = field(default_factory=list)


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="fusec", version=__version__,
                  description="OpenAI-compatible API served by fusec (a drop-in for `vllm serve`).")
    tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len
    metrics = ServerMetrics(engine, settings.served_model_names[0])
    app.state.engine, app.state.metrics = engine, metrics

    # -- errors ------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", None
        return error_response(400, f"{message}" + (f" ({where})" if where else ""), where)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(FusecError)
    async def _input_error(_: Request, exc: FusecError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}")

    # -- auth and model names ---------------------------------------------------------------
    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {settings.api_key}":
            raise APIError(401, "invalid or missing API key")

    def model_name(requested: str | None) -> str:
        if requested is None:
            return settings.served_model_names[0]
        if requested not in settings.served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist.", "model")
        return requested

    def need_tokenizer():
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompt token ids")
        return tokenizer

    # -- plain endpoints --------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "fusec", "root": settings.model_path,
             "parent": None, "max_model_len": max_model_len} for name in settings.served_model_names]}

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(req: TokenizeRequest) -> dict:
        model_name(req.model)
        tok = need_tokenizer()
        if req.messages is not None:
            ids = tok.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages],
                                  req.add_generation_prompt)
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages")
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(req: DetokenizeRequest) -> dict:
        model_name(req.model)
        tok = need_tokenizer()
        vocab = engine.engine.model.config.vocab_size
        if any(t >= vocab for t in req.tokens):
            raise APIError(400, f"token ids must be below the vocabulary size {vocab}", "tokens")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}

    # -- generation ----------------------------------------------------------------------------
    async def start(prompts: list[tuple[str | None, list[int]]], params: SamplingParams, base_id: str) -> list[_Job]:
        """Submit every prompt and wait for each one's first output, so bad input is a
        400 before any byte of a response is sent."""
        jobs = [_Job(ids, text, engine.generate(None, params, request_id=f"{base_id}-{i}", prompt_token_ids=ids))
                for i, (text, ids) in enumerate(prompts)]
        try:
            for job in jobs:
                job.first = await job.generator.__anext__()
                job.streams = [_Stream(last_time=time.monotonic()) for _ in range(params.n)]
                metrics.prompt_tokens.inc(len(job.prompt_ids))
        except BaseException:
            for job in jobs:
                await job.generator.aclose()
            raise
        return jobs

    def record(stream: _Stream, out: CompletionOutput, arrival: float) -> None:
        now = time.monotonic()
        new = len(out.token_ids) - stream.token_count
        if new > 0:
            if stream.token_count == 0:
                metrics.ttft.observe(now - arrival)
            else:
                for _ in range(new):
                    metrics.itl.observe((now - stream.last_time) / new)
            metrics.generation_tokens.inc(new)
            stream.token_count, stream.last_time = len(out.token_ids), now
        if out.finished and not stream.done:
            stream.done = True
            metrics.e2e.observe(now - arrival)
            metrics.finished(out.finish_reason or "stop")

    async def outputs_of(job: _Job) -> AsyncIterator[RequestOutput]:
        if job.first is not None:
            first, job.first = job.first, None
            yield first
            if first.finished:
                return
        async for out in job.generator:
            yield out

    async def merged(jobs: list[_Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several prompts as they come."""
        if len(jobs) == 1:
            try:
                async for out in outputs_of(jobs[0]):
                    yield 0, out
            finally:
                await jobs[0].generator.aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: _Job) -> None:
            try:
                async for out in outputs_of(job):
                    await queue.put((i, out))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        try:
            remaining = len(jobs)
            while remaining:
                i, out = await queue.get()
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for t in tasks:
                t.cancel()
            for job in jobs:
                await job.generator.aclose()

    def token_str(tid: int) -> str:
        return tokenizer.decode([tid], skip_special_tokens=False) if tokenizer else str(tid)

    def completion_logprobs(lps: list[Logprob], offset: int) -> dict:
        tokens = [token_str(lp.token_id) for lp in lps]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{token_str(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}

    def chat_logprobs(lps: list[Logprob]) -> dict:
        def entry(tid: int, value: float) -> dict:
            s = token_str(tid)
            return {"token": s, "logprob": value, "bytes": list(s.encode())}
        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    def usage(jobs: list[_Job], completion_tokens: int) -> dict:
        prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, raw: Request):
        name = model_name(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (prompt logprobs are not computed)", "echo")
        prompt = req.prompt
        if isinstance(prompt, str):
            items = [(prompt, need_tokenizer().encode(prompt))]
        elif not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        elif isinstance(prompt[0], str):
            items = [(p, need_tokenizer().encode(p)) for p in prompt]
        elif isinstance(prompt[0], int):
            items = [(None, list(prompt))]
        else:
            items = [(None, list(p)) for p in prompt]
        params = req.sampling_params(req.max_tokens, req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        arrival = time.monotonic()
        jobs = await start(items, params, rid)
        n = params.n

        def prefix(job: _Job) -> str:
            if not req.echo:
                return ""
            return job.prompt_text if job.prompt_text is not None else need_tokenizer().decode(job.prompt_ids)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream() -> AsyncIterator[str]:
                total = 0
                async for i, out in merged(jobs):
                    job = jobs[i]
                    for c in out.outputs:
                        st = job.streams[c.index]
                        if st.done:
                            continue
                        delta = c.text[st.text_len:]
                        if st.text_len == 0 and st.token_count == 0:
                            delta = prefix(job) + delta
                        new_lps = c.logprobs[st.logprob_count:] if c.logprobs is not None else None
                        before = st.token_count
                        record(st, c, arrival)
                        if not delta and not c.finished and st.token_count == before:
                            continue
                        choice = {"index": i * n + c.index, "text": delta,
                                  "logprobs": completion_logprobs(new_lps, st.text_len) if new_lps is not None else None,
                                  "finish_reason": c.finish_reason if c.finished else None,
                                  "stop_reason": c.stop_reason if c.finished else None}
                        st.text_len = len(c.text)
                        st.logprob_count = len(c.logprobs or [])
                        total = sum(s.token_count for j in jobs for s in j.streams)
                        chunk = {"id": rid, "object": "text_completion", "created": created, "model": name,
                                 "choices": [choice]}
                        if include_usage:
                            chunk["usage"] = None
                        yield sse(chunk)
                if include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                               "choices": [], "usage": usage(jobs, total)})
                yield sse("[DONE]")
            return StreamingResponse(stream(), media_type="text/event-stream")

        final: dict[tuple[int, int], CompletionOutput] = {}
        outputs = merged(jobs)
        try:
            async for i, out in outputs:
                for c in out.outputs:
                    record(jobs[i].streams[c.index], c, arrival)
                    final[(i, c.index)] = c
                if await raw.is_disconnected():
                    return Response(status_code=499)  # the client is gone; `finally` aborts the rest
        finally:
            await outputs.aclose()
        choices = []
        for (i, j), c in sorted(final.items()):
            pre = prefix(jobs[i])
            choices.append({"index": i * n + j, "text": pre + c.text,
                            "logprobs": completion_logprobs(c.logprobs, len(pre)) if c.logprobs is not None else None,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                "usage": usage(jobs, sum(len(c.token_ids) for c in final.values()))}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatCompletionRequest, raw: Request):
        name = model_name(req.model)
        tok = need_tokenizer()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = tok.encode_chat(messages, req.add_generation_prompt)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        params = req.sampling_params(req.max_completion_tokens or req.max_tokens, logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        arrival = time.monotonic()
        (job,) = await start([(None, ids)], params, rid)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list, usage_value: Any = None, with_usage: bool = False) -> str:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": choices}
                if with_usage:
                    body["usage"] = usage_value
                return sse(body)

            async def stream() -> AsyncIterator[str]:
                for k in range(params.n):
                    yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}], None, include_usage)
                async for _, out in merged([job]):
                    for c in out.outputs:
                        st = job.streams[c.index]
                        if st.done:
                            continue
                        delta = c.text[st.text_len:]
                        new_lps = c.logprobs[st.logprob_count:] if c.logprobs is not None else None
                        before = st.token_count
                        record(st, c, arrival)
                        if not delta and not c.finished and st.token_count == before:
                            continue
                        st.text_len, st.logprob_count = len(c.text), len(c.logprobs or [])
                        yield chunk([{"index": c.index, "delta": {"content": delta} if delta else {},
                                      "logprobs": chat_logprobs(new_lps) if new_lps is not None else None,
                                      "finish_reason": c.finish_reason if c.finished else None,
                                      "stop_reason": c.stop_reason if c.finished else None}], None, include_usage)
                if include_usage:
                    yield chunk([], usage([job], sum(s.token_count for s in job.streams)), True)
                yield sse("[DONE]")
            return StreamingResponse(stream(), media_type="text/event-stream")

        final: dict[int, CompletionOutput] = {}
        outputs = merged([job])
        try:
            async for _, out in outputs:
                for c in out.outputs:
                    record(job.streams[c.index], c, arrival)
                    final[c.index] = c
                if await raw.is_disconnected():
                    return Response(status_code=499)
        finally:
            await outputs.aclose()
        choices = [{"index": k, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for k, c in sorted(final.items())]
        return {"id": rid, "object": "chat.completion", "created": created, "model": name, "choices": choices,
                "usage": usage([job], sum(len(c.token_ids) for c in final.values()))}

    return app
