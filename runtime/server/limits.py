"""The checks a request passes before its body is read: the API key on the protected
paths, and the body's size, counted while it arrives. A pure ASGI middleware, so a
refused body is never read into memory, let alone parsed as JSON."""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fusec.runtime.server.errors import error_response

# vLLM's rule: everything under /v1 needs the key, and so do the tokenizer routes;
# /health, /version, /metrics and the docs stay open
_PROTECTED_PATHS = frozenset({"/tokenize", "/detokenize"})


def protected(path: str) -> bool:
    """Whether a route path (the root path taken off) needs the API key."""
    return path.startswith("/v1/") or path in _PROTECTED_PATHS


class _BodyTooLarge(Exception):
    """Raised into the app once the body passes the limit (the 413 has gone out)."""


class RequestLimits:
    """401 without a valid `Authorization: Bearer KEY` on a protected path, and 413 for a
    body over max_request_bytes: at once when Content-Length says so, else as soon as the
    count of received bytes passes it. Both answers close the connection, so the unread
    rest of the body is neither read nor waited for."""

    def __init__(self, app: ASGIApp, api_keys: list[str], max_request_bytes: int) -> None:
        self.app = app
        self.keys = [f"Bearer {k}".encode() for k in api_keys]
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # CORS preflights (OPTIONS) carry no credentials: they stay open, as in vLLM
        if self.keys and scope["method"] != "OPTIONS" and protected(_route_path(scope)) \
                and not self._authorized(scope):
            await _refuse(scope, receive, send, 401, "invalid or missing API key")
            return
        length = _content_length(scope)
        if length is not None and length > self.max_request_bytes:
            # a body up to twice the limit is read away first (discarded, never kept): closing
            # on unread bytes makes the kernel reset the connection, and the client may lose
            # the 413 in flight; a larger one is cut off at once
            near = length <= 2 * self.max_request_bytes
            if near:
                await _drain(receive)
            await _refuse(scope, receive, send, 413, self._too_large_message(), close=not near)
            return
        await self._counted(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = _header(scope, b"authorization") or b""
        # constant-time comparison: the answer's timing tells nothing about the key
        return any(hmac.compare_digest(given, key) for key in self.keys)

    def _too_large_message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_request_bytes} bytes " \
               "(--max-request-bytes)"

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with a receive that counts body bytes and answers 413 when they pass
        the limit; what the app sends after that is dropped."""
        received = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    if not started:  # routes read the whole body before answering, so this is the rule
                        refused = True
                        await _refuse(scope, receive, send, 413, self._too_large_message())
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not refused:
                raise


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                  close: bool = True) -> None:
    response = error_response(status, message)
    if close:  # the client may still be sending the body: closing ends that instead of draining it
        response.headers["connection"] = "close"
    await response(scope, receive, send)


async def _drain(receive: Receive) -> None:
    """Read the rest of a request's body, keeping none of it."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _route_path(scope: Scope) -> str:
    """The path the router matches: without the root path a proxy serves the API under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and (path == root or path.startswith(root + "/")) else path
