"""AsyncEngine: the engine's step loop on a background thread, feeding per-request
asyncio queues. A request whose consumer goes away (cancelled, disconnected) is
aborted and its KV blocks freed."""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Sequence as Seq

from fusec.runtime.engine import LLMEngine
from fusec.runtime.outputs import RequestOutput
from fusec.runtime.sequence import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class EngineLoad:
    running: int
    waiting: int
    kv_usage: float
    preemptions: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # add / abort / step never interleave
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="fusec-engine", daemon=True)
        self._thread.start()

    # -- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        self.engine.runner.bind_thread()
        while not self._stop:
            with self._lock:
                busy = self.engine.has_unfinished_requests()
            if not busy:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
            except Exception as e:  # fail the requests in flight, keep serving
                log.exception("engine step failed")
                with self._lock:
                    ids = list(self.engine.requests)
                    for rid in ids:
                        self.engine.abort_request(rid)
                for rid in ids:
                    self._deliver(rid, e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        target = self._queues.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            self._queues.pop(request_id, None)

    # -- requests ---------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    async def generate(self, prompt: str | None, params: SamplingParams, request_id: str | None = None,
                       prompt_token_ids: Seq[int] | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each holds everything so far); the last is finished.
        Bad input raises InputError before anything is yielded."""
        request_id = request_id or self.new_request_id()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        try:
            with self._lock:
                self.engine.add_request(request_id, prompt, params, prompt_token_ids=prompt_token_ids)
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort_request(request_id)
        self._queues.pop(request_id, None)

    def load(self) -> EngineLoad:
        with self._lock:
            s = self.engine.scheduler
            return EngineLoad(len(s.running), len(s.waiting), self.engine.blocks.usage, s.num_preemptions)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.close()
