"""uvicorn's server with a shutdown that ends every answer well-formed.

uvicorn drains on SIGINT / SIGTERM (no new connections; in-flight responses may finish)
and, past its timeout, cancels what still runs: a stream cut that way has no final chunk,
no `[DONE]`, and a CancelledError traceback per request. Here the drain has a deadline
of its own: when it passes, or at a second signal, every request is aborted in the
engine, so a stream gets its last chunk (finish_reason "abort") and `[DONE]`, and a
whole answer comes back with what it has. uvicorn's cancellation stays as the last resort
a few seconds later; a third SIGINT still forces the exit at once.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from fusec.runtime.async_engine import AsyncEngine

log = logging.getLogger("fusec.server")

CANCEL_AFTER_S = 5.0  # after the requests are aborted, what uvicorn waits before cancelling tasks


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_s: float) -> None:
        config.timeout_graceful_shutdown = drain_s + CANCEL_AFTER_S
        super().__init__(config)
        self.engine = engine
        self.drain_s = drain_s
        self._ended = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # runs in a signal handler: only flags and a queue put (SimpleQueue.put is reentrant)
        if self.should_exit and not self._ended:  # a second signal: end the requests now
            self._end_requests()
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.drain_s > 0:
            log.info("draining: running requests have %g s to finish (a second signal ends them now)", self.drain_s)
        deadline = asyncio.get_running_loop().call_later(self.drain_s, self._end_requests)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _end_requests(self) -> None:
        if not self._ended:
            self._ended = True
            self.engine.end_all()
