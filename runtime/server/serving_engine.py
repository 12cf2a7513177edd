"""OpenAIServing: what every endpoint that reads prompts shares (the engine, the served
model names, the tokenizer). Tokenization and chat templating run in a worker thread:
a long prompt must not stall the event loop, which serves every other client."""
from __future__ import annotations

import asyncio
from typing import Any

from fusec.models.tokenizer import Tokenizer
from fusec.runtime.async_engine import AsyncEngine, RequestStream
from fusec.runtime.sequence import PoolingParams, SamplingParams
from fusec.runtime.server.errors import APIError
from fusec.runtime.server.protocol import ChatMessage
from fusec.runtime.server.serving_models import OpenAIServingModels


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, models: OpenAIServingModels) -> None:
        self.engine = engine
        self.models = models
        self.tokenizer: Tokenizer | None = engine.engine.tokenizer

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompt token ids")
        return self.tokenizer

    @staticmethod
    def _prompt_list(given: str | list[str] | list[int] | list[list[int]], field: str) -> list[str] | list[list[int]]:
        """OpenAI's prompt forms (a string, strings, token ids, lists of token ids) as a list
        of prompts: strings, or token-id lists."""
        if isinstance(given, str):
            return [given]
        if not given:
            raise APIError(400, f"{field} is empty", field)
        if isinstance(given[0], int):
            return [list(given)]
        return list(given)

    async def _encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        tok = self._need_tokenizer()
        return await asyncio.to_thread(lambda: [tok.encode(t, add_special_tokens=add_special_tokens) for t in texts])

    async def _encode_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                           template_args: dict[str, Any]) -> list[int]:
        """The conversation through the model's chat template; template_args are its
        extra variables (tools, chat_template_kwargs)."""
        tok = self._need_tokenizer()
        turns = [m.template_dict() for m in messages]
        return await asyncio.to_thread(tok.encode_chat, turns, add_generation_prompt, **template_args)

    async def _compile_constraint(self, params: SamplingParams) -> None:
        """Compile a request's structured-output constraint before the engine takes it (in
        a worker thread: a large schema takes a while), so a bad one is a 400 and the
        engine's step loop only copies the compiled grammar."""
        if params.structured_outputs is None:
            return
        grammars = self.engine.engine.grammars
        if grammars is None:
            raise APIError(400, "structured outputs need the model's tokenizer")
        await asyncio.to_thread(grammars.compile, params.structured_outputs)

    async def _add_all(self, request_id: str, prompts: list[list[int]], params: SamplingParams | PoolingParams,
                       arrival: float | None = None) -> list[RequestStream]:
        """Hand every prompt of a request to the engine together (ids request_id-0, -1,
        ...) and wait until all are taken, so bad input is a 400 before any byte of a
        response is sent; on one's error the others are aborted."""
        results = await asyncio.gather(
            *(self.engine.add_request(f"{request_id}-{i}", None, params, prompt_token_ids=ids, arrival=arrival)
              for i, ids in enumerate(prompts)), return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for s in streams:
                s.abort()
            raise errors[0]
        return streams

    async def _decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        tok = self._need_tokenizer()
        return await asyncio.to_thread(tok.decode, ids, skip_special_tokens)
