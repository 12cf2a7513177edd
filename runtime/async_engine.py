"""AsyncEngine: the engine's step loop on its own thread (vLLM's EngineCore shape).

The engine thread owns the LLMEngine: it takes new requests and aborts from a
thread-safe queue between steps, steps, publishes a load snapshot and hands outputs
to each request's asyncio queue. Coroutines only enqueue commands and await their
queues, so nothing on an event loop ever waits for a forward pass. A request whose
consumer goes away (cancelled, disconnected, dropped) is aborted and its KV blocks
freed."""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence as Seq

from fusec.runtime.engine import LLMEngine, NonFiniteValues
from fusec.runtime.outputs import EmbeddingRequestOutput, RequestOutput
from fusec.runtime.sequence import PoolingParams, SamplingParams

log = logging.getLogger(__name__)


Output = RequestOutput | EmbeddingRequestOutput  # a generation's, or an embedding request's one output


class EngineShutDown(RuntimeError):
    """The engine thread has stopped: the request was not (or no longer) served."""

    def __init__(self, message: str = "the engine is shut down") -> None:
        super().__init__(message)


@dataclass(frozen=True)
class EngineLoad:
    """What the engine is doing, and its totals since start (monotonic: the server's
    counters read them)."""
    running: int
    waiting: int
    kv_usage: float
    preemptions: int
    steps: int
    prompt_tokens: int  # of requests whose prefill finished
    cached_prompt_tokens: int  # of those, read from the prefix cache
    generation_tokens: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, found there


@dataclass
class _Channel:
    """Where the engine thread sends one request's acceptance and outputs. Both live on
    the consumer's event loop, so the engine thread only reaches them through
    call_soon_threadsafe."""
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future[None]
    outputs: asyncio.Queue[Output | BaseException]

    def accept(self, error: BaseException | None) -> bool:
        return self._call(_resolve, self.accepted, error)

    def send(self, item: Output | BaseException) -> bool:
        return self._call(self.outputs.put_nowait, item)

    def _call(self, fn: Callable, *args) -> bool:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            return False


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the consumer stopped waiting (cancelled)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    params: SamplingParams | PoolingParams
    prompt_token_ids: list[int] | None
    channel: _Channel
    arrival: float | None = None  # when the caller received it (time.monotonic())


@dataclass(frozen=True)
class _StepWatcher:
    """A callback on a consumer's event loop, told the tokens each step computed."""
    loop: asyncio.AbstractEventLoop
    callback: Callable[[int], None]


@dataclass
class _Abort:
    request_id: str
    channel: _Channel  # only this submission: a rejected duplicate id must not abort the original


class _EndAll:
    """Abort every request, each with its final output, and refuse new ones (a server
    that is shutting down)."""


class _Stop:
    pass


_Command = _Add | _Abort | _EndAll | _Stop


class EngineLoop:
    """The engine thread's side: everything here runs on that thread, except `load`,
    which any thread may read (a snapshot replaced after every change)."""

    def __init__(self, engine: LLMEngine, commands: queue.SimpleQueue[_Command]) -> None:
        self.engine = engine
        self.commands = commands
        self.channels: dict[str, _Channel] = {}
        self.watchers: tuple[_StepWatcher, ...] = ()  # replaced whole by other threads, never mutated
        self.stopping = False
        self.refusing = False  # after _EndAll: new requests get EngineShutDown
        self.load = self._snapshot()

    def run(self) -> None:
        self.engine.runner.bind_thread()
        try:
            while not self.stopping:
                self._apply(self._next_commands())
                if not self.stopping and self.engine.has_unfinished_requests():
                    self._step()
        except Exception:
            log.exception("engine loop failed")
        finally:
            self.stopping = True
            self._fail_all(EngineShutDown())
            self._apply(self._drain())  # reject what came in meanwhile: no consumer waits forever
            self.load = self._snapshot()

    def _next_commands(self) -> list[_Command]:
        if self.engine.has_unfinished_requests():
            return self._drain()
        return [self.commands.get()] + self._drain()  # idle: sleep until there is something to do

    def _drain(self) -> list[_Command]:
        out = []
        while True:
            try:
                out.append(self.commands.get_nowait())
            except queue.Empty:
                return out

    def _apply(self, commands: list[_Command]) -> None:
        for cmd in commands:
            if isinstance(cmd, _Stop):
                self.stopping = True
            elif isinstance(cmd, _Abort):
                if self.channels.get(cmd.request_id) is cmd.channel:
                    del self.channels[cmd.request_id]
                    self.engine.abort_request(cmd.request_id)
            elif isinstance(cmd, _EndAll):
                self._end_all()
            elif self.stopping or self.refusing:
                cmd.channel.accept(EngineShutDown())
            else:
                self._add(cmd)
        if commands:
            self.load = self._snapshot()

    def _add(self, cmd: _Add) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, prompt_token_ids=cmd.prompt_token_ids,
                                    arrival=cmd.arrival)
        except Exception as e:  # bad input: the caller raises it before anything is streamed
            cmd.channel.accept(e)
            return
        self.channels[cmd.request_id] = cmd.channel
        if not cmd.channel.accept(None):
            self._abort(cmd.request_id)

    def _step(self) -> None:
        computed = self.engine.stats.computed_tokens
        try:
            outputs = self.engine.step()
        except NonFiniteValues as e:  # only these requests fail; the others' outputs came with it
            for request_id in e.request_ids:
                channel = self.channels.pop(request_id, None)
                if channel is not None:
                    channel.send(e)
            outputs = e.outputs
        except Exception as e:  # fail the requests in flight, keep serving
            log.exception("engine step failed")
            self._fail_all(e)
            outputs = []
        # publish before delivering: a consumer that sees its request finish sees the load without it
        self.load = self._snapshot()
        if tokens := self.engine.stats.computed_tokens - computed:
            for w in self.watchers:
                try:
                    w.loop.call_soon_threadsafe(w.callback, tokens)
                except RuntimeError:  # its loop is closed: nobody is listening
                    pass
        for out in outputs:
            channel = self.channels.get(out.request_id)
            if channel is None:
                continue
            if out.finished:
                del self.channels[out.request_id]
            if not channel.send(out):
                self._abort(out.request_id)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, channel in list(self.channels.items()):
            self._abort(request_id)
            channel.send(error)

    def _end_all(self) -> None:
        self.refusing = True
        if self.channels:
            log.warning("aborting %d running request(s): the server is shutting down", len(self.channels))
        for request_id, channel in list(self.channels.items()):
            del self.channels[request_id]
            final = self.engine.abort_request(request_id)
            channel.send(final if final is not None else EngineShutDown("the server is shutting down"))

    def _abort(self, request_id: str) -> None:
        self.channels.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _snapshot(self) -> EngineLoad:
        s, blocks, stats = self.engine.scheduler, self.engine.blocks, self.engine.stats
        return EngineLoad(len(s.running), len(s.waiting), blocks.usage, s.num_preemptions, stats.steps,
                          stats.prefilled_tokens, stats.prefilled_cached_tokens, stats.generated_tokens,
                          blocks.cache_queries, blocks.cache_hits)


class RequestStream:
    """One request's outputs on its consumer's event loop; each holds everything so far
    and the last is finished. Aborting it, or dropping it unfinished, aborts the request."""

    def __init__(self, request_id: str, channel: _Channel, commands: queue.SimpleQueue[_Command]) -> None:
        self.request_id = request_id
        self.finished = False
        self._outputs = channel.outputs
        # a finalizer, not only an explicit abort: a response that never starts its body
        # (the client left first) drops its stream without iterating it
        self._abort = weakref.finalize(self, commands.put, _Abort(request_id, channel))
        self._abort.atexit = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Output:
        if self.finished:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, BaseException) or item.finished:  # the engine has let go of the request
            self.finished = True
            self._abort.detach()
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self) -> None:
        """Abort the request unless it has finished (idempotent, never blocks)."""
        self.finished = True
        self._abort()


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._loop = EngineLoop(engine, self._commands)
        self._closed = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop.run, name="fusec-engine", daemon=True)
        self._thread.start()

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    async def add_request(self, request_id: str, prompt: str | None, params: SamplingParams | PoolingParams,
                          prompt_token_ids: Seq[int] | None = None, arrival: float | None = None) -> RequestStream:
        """Hand a request to the engine thread and wait until it is taken (at the next
        step boundary). Bad input raises InputError here, before anything is streamed.
        An embedding request (PoolingParams) streams one, finished, output. `arrival`
        (time.monotonic()) starts its latencies; by default, when the engine takes it."""
        if self._closed:
            raise EngineShutDown()
        loop = asyncio.get_running_loop()
        channel = _Channel(loop, loop.create_future(), asyncio.Queue())
        ids = list(prompt_token_ids) if prompt_token_ids is not None else None
        self._commands.put(_Add(request_id, prompt, params, ids, channel, arrival))
        try:
            await channel.accepted
        except asyncio.CancelledError:
            self._commands.put(_Abort(request_id, channel))  # it may have been taken meanwhile
            raise
        return RequestStream(request_id, channel, self._commands)

    async def generate(self, prompt: str | None, params: SamplingParams, request_id: str | None = None,
                       prompt_token_ids: Seq[int] | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each holds everything so far); the last is finished.
        Bad input raises InputError before anything is yielded."""
        stream = await self.add_request(request_id or self.new_request_id(), prompt, params, prompt_token_ids)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def load(self) -> EngineLoad:
        return self._loop.load

    def watch_steps(self, callback: Callable[[int], None]) -> None:
        """Call callback(tokens) on the running event loop after every step that ran the
        model, with the tokens it computed."""
        self._loop.watchers = (*self._loop.watchers, _StepWatcher(asyncio.get_running_loop(), callback))

    def end_all(self) -> None:
        """Abort every request: a generation's stream ends with what it has (finish_reason
        "abort"), an embedding request fails with EngineShutDown; new requests are refused.
        Safe to call from a signal handler (it only enqueues)."""
        self._commands.put(_EndAll())

    def shutdown(self) -> None:
        """Stop the loop (requests still in flight fail with EngineShutDown), join, close."""
        self._closed = True
        self._commands.put(_Stop())
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            log.warning("the engine thread did not stop within 30 s; closing the engine anyway")
        self.engine.close()
