"""The one generation path that completions and chat share: submit every prompt, then
either stream SSE chunks of what each sequence added or aggregate the final outputs,
counting tokens and latencies for the metrics on the way. Subclasses say only how a
choice, a chunk and a response look."""
from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import AsyncIterator, Generic, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from fusec.runtime.async_engine import AsyncEngine, RequestStream
from fusec.runtime.outputs import CompletionOutput, RequestOutput
from fusec.runtime.sequence import Logprob, SamplingParams
from fusec.runtime.server.errors import stream_error_event
from fusec.runtime.server.metrics import RequestStats, ServerMetrics
from fusec.runtime.server.protocol import PromptLogprob, PromptLogprobs, SamplingFields, UsageInfo
from fusec.runtime.server.serving_engine import OpenAIServing
from fusec.runtime.server.serving_models import OpenAIServingModels

RequestT = TypeVar("RequestT", bound=SamplingFields)


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # the prompt as given (echo), when it was text


@dataclass
class Progress:
    """How much of one sequence has been sent and counted."""
    text_len: int = 0
    token_count: int = 0
    logprob_count: int = 0
    done: bool = False


@dataclass
class Generation(Generic[RequestT]):
    """One API request: its prompts (one engine request each) and n sequences per prompt."""
    request: RequestT
    request_id: str
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.monotonic)
    progress: list[list[Progress]] = field(init=False)  # [prompt][sequence]
    prompt_logprobs: dict[int, list[Logprob | None]] = field(init=False, default_factory=dict)  # by prompt
    stats: list[RequestStats] = field(init=False, default_factory=list)  # by prompt, once the engine took them

    def __post_init__(self) -> None:
        self.progress = [[Progress() for _ in range(self.params.n)] for _ in self.prompts]

    @property
    def include_usage(self) -> bool:
        return bool(self.request.stream_options and self.request.stream_options.include_usage)

    def choice_index(self, prompt_index: int, output: CompletionOutput) -> int:
        return prompt_index * self.params.n + output.index

    def usage(self, completion_tokens: int) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


@dataclass
class Delta:
    """What one sequence added since its last chunk."""
    index: int  # the choice index
    prompt_index: int
    output: CompletionOutput
    text: str
    logprobs: list[Logprob] | None
    text_offset: int  # characters of this sequence sent before
    first: bool  # nothing of this sequence was sent before


class OpenAIServingGenerate(OpenAIServing, ABC, Generic[RequestT]):
    request_id_prefix: str
    chunk_type: type[BaseModel]  # a stream chunk: id, created, model, choices, usage
    response_type: type[BaseModel]  # the whole answer: id, created, model, choices, usage
    generation_type: type[Generation] = Generation  # a subclass carries what an endpoint adds per request

    def __init__(self, engine: AsyncEngine, models: OpenAIServingModels, metrics: ServerMetrics) -> None:
        super().__init__(engine, models)
        self.metrics = metrics

    # -- what subclasses say ------------------------------------------------------------------
    def _opening_choices(self, gen: Generation[RequestT]) -> list[BaseModel]:
        """Choices sent before any output (chat: the role), one chunk each."""
        return []

    @abstractmethod
    def _stream_choice(self, gen: Generation[RequestT], delta: Delta) -> BaseModel | None:
        """The chunk choice for a delta; None when there is nothing to send yet."""

    @abstractmethod
    def _final_choice(self, gen: Generation[RequestT], index: int, prompt_index: int,
                      output: CompletionOutput) -> BaseModel: ...

    # -- the shared path ----------------------------------------------------------------------------
    def _new_generation(self, request: RequestT, model: str, prompts: list[Prompt], params: SamplingParams,
                        **extra) -> Generation[RequestT]:
        return self.generation_type(request, f"{self.request_id_prefix}-{uuid.uuid4().hex}", model, prompts, params,
                                    **extra)

    async def _generate(self, gen: Generation[RequestT], raw: Request) -> Response | BaseModel:
        await self._compile_constraint(gen.params)
        streams = await self._submit(gen)
        if gen.request.stream:
            return StreamingResponse(self._stream(gen, streams), media_type="text/event-stream")
        return await self._aggregate(gen, streams, raw)

    async def _submit(self, gen: Generation[RequestT]) -> list[RequestStream]:
        streams = await self._add_all(gen.request_id, [p.token_ids for p in gen.prompts], gen.params, gen.arrival)
        gen.stats = [self.metrics.track(s.request_id, len(p.token_ids), gen.params, gen.arrival)
                     for s, p in zip(streams, gen.prompts)]
        return streams

    async def _stream(self, gen: Generation[RequestT], streams: list[RequestStream]) -> AsyncIterator[str]:
        outputs = MergedOutputs(streams)
        ending = "abort"
        failure: Exception | None = None
        try:
            for choice in self._opening_choices(gen):
                yield self._sse(gen, self._chunk(gen, [choice]))
            async for i, out in outputs:
                gen.stats[i].update(out)
                for c in out.outputs:
                    delta = self._advance(gen, i, c)
                    choice = self._stream_choice(gen, delta) if delta is not None else None
                    if choice is not None:
                        yield self._sse(gen, self._chunk(gen, [choice]))
        except Exception as e:  # the status line is sent: the error goes as an event, the stream ends well-formed
            ending, failure = "error", e
        finally:
            self._end(gen, outputs, ending)  # a disconnected client lands here: abort what is left
        if failure is not None:
            yield stream_error_event(failure)
        elif gen.include_usage:
            tokens = sum(p.token_count for per_prompt in gen.progress for p in per_prompt)
            yield self._sse(gen, self._chunk(gen, [], gen.usage(tokens)))
        yield "data: [DONE]\n\n"

    async def _aggregate(self, gen: Generation[RequestT], streams: list[RequestStream],
                         raw: Request) -> Response | BaseModel:
        final: dict[tuple[int, int], CompletionOutput] = {}
        outputs = MergedOutputs(streams)
        ending = "abort"
        try:
            async for i, out in outputs:
                gen.stats[i].update(out)
                for c in out.outputs:
                    self._record(gen.progress[i][c.index], c)
                    final[(i, c.index)] = c
                if out.prompt_logprobs is not None:
                    gen.prompt_logprobs[i] = out.prompt_logprobs
                if await raw.is_disconnected():
                    return Response(status_code=499)  # the client is gone; `finally` aborts the rest
        except Exception:
            ending = "error"
            raise
        finally:
            self._end(gen, outputs, ending)
        choices = [self._final_choice(gen, gen.choice_index(i, c), i, c) for (i, _), c in sorted(final.items())]
        usage = gen.usage(sum(len(c.token_ids) for c in final.values()))
        return self.response_type(id=gen.request_id, created=gen.created, model=gen.model, choices=choices,
                                  usage=usage, **self._response_fields(gen))

    def _response_fields(self, gen: Generation[RequestT]) -> dict:
        """What a whole answer carries beyond its choices and usage."""
        return {}

    def _prompt_logprobs(self, gen: Generation[RequestT], prompt_index: int) -> PromptLogprobs | None:
        """A prompt's prompt_logprobs in vLLM's shape, when they were asked for."""
        lps = gen.prompt_logprobs.get(prompt_index)
        if lps is None:
            return None
        entry = lambda token, logprob, rank: PromptLogprob(logprob=logprob, rank=rank,
                                                           decoded_token=self._token_str(token))
        return [None if lp is None else {lp.token_id: entry(lp.token_id, lp.logprob, lp.rank),
                                         **{t: entry(t, v, r) for r, (t, v) in enumerate(lp.top, 1)}}
                for lp in lps]

    def _advance(self, gen: Generation[RequestT], prompt_index: int, out: CompletionOutput) -> Delta | None:
        """Count a sequence's new output; what to send of it, or None when nothing is new."""
        p = gen.progress[prompt_index][out.index]
        if p.done:
            return None
        first = p.text_len == 0 and p.token_count == 0
        text = out.text[p.text_len:]
        logprobs = out.logprobs[p.logprob_count:] if out.logprobs is not None else None
        tokens_before = p.token_count
        self._record(p, out)
        if not text and not out.finished and p.token_count == tokens_before:
            return None
        delta = Delta(gen.choice_index(prompt_index, out), prompt_index, out, text, logprobs, p.text_len, first)
        p.text_len, p.logprob_count = len(out.text), len(out.logprobs or [])
        return delta

    @staticmethod
    def _record(p: Progress, out: CompletionOutput) -> None:
        p.token_count, p.done = len(out.token_ids), out.finished

    @staticmethod
    def _end(gen: Generation[RequestT], outputs: MergedOutputs, ending: str) -> None:
        """Abort what has not finished; its requests count as ended by `ending` ("abort":
        the client left or the answer was cut short; "error": a step failed)."""
        outputs.close()
        for stats in gen.stats:
            stats.close(ending)

    def _chunk(self, gen: Generation[RequestT], choices: list[BaseModel], usage: UsageInfo | None = None) -> BaseModel:
        return self.chunk_type(id=gen.request_id, created=gen.created, model=gen.model, choices=choices, usage=usage)

    @staticmethod
    def _sse(gen: Generation, chunk: BaseModel) -> str:
        # `usage` is part of every chunk (null until the last) only when the client asked for it
        body = chunk.model_dump_json(exclude=None if gen.include_usage else {"usage"})
        return f"data: {body}\n\n"

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)


class MergedOutputs:
    """The outputs of several prompts' requests as they come, with each one's index.
    Closing it aborts every request that has not finished, whether or not iteration
    began (a client can leave before the first chunk)."""

    def __init__(self, streams: list[RequestStream]) -> None:
        self.streams = streams
        self._queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._remaining = len(streams)

    def __aiter__(self) -> MergedOutputs:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self.streams)]
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while self._remaining:
            i, item = await self._queue.get()
            if item is None:
                self._remaining -= 1
            elif isinstance(item, Exception):  # a failed step: the whole answer fails
                raise item
            else:
                return i, item
        raise StopAsyncIteration

    async def _pump(self, i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((i, out))
            self._queue.put_nowait((i, None))
        except Exception as e:
            self._queue.put_nowait((i, e))

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for s in self.streams:
            s.abort()
