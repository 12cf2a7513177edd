"""Errors as OpenAI error bodies: `{"error": {"message", "type", "param", "code"}}`."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fusec.errors import FusecError
from fusec.runtime.async_engine import EngineShutDown
from fusec.runtime.engine import NonFiniteValues
from fusec.runtime.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("fusec.server")

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
               413: "RequestTooLarge", 422: "BadRequestError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


class APIError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    # a message may quote the request (a model name): lone surrogates must not make it unencodable
    message, param = _encodable(message), None if param is None else _encodable(param)
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "APIError"), param=param,
                                         code=status))


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param).model_dump(), status_code=status)


def stream_error_event(exc: Exception) -> str:
    """An SSE event for an error after a stream began (its status line is sent), as
    vLLM sends one: `data: {"error": ...}`."""
    if isinstance(exc, NonFiniteValues):
        body = error_body(500, str(exc))
    elif isinstance(exc, EngineShutDown):
        body = error_body(503, str(exc))
    elif isinstance(exc, FusecError):
        body = error_body(400, str(exc))
    else:
        log.error("stream failed", exc_info=exc)
        body = error_body(500, f"internal error: {type(exc).__name__}")
    return f"data: {body.model_dump_json()}\n\n"


def install_error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(NonFiniteValues)
    async def _model_fault(_: Request, exc: NonFiniteValues) -> JSONResponse:
        return error_response(500, str(exc))  # the model's fault, not the request's

    @app.exception_handler(EngineShutDown)
    async def _shut_down(_: Request, exc: EngineShutDown) -> JSONResponse:
        return error_response(503, str(exc))  # the server is going away: try another replica

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}")
