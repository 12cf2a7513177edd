"""`/v1/chat/completions`: messages through the model's chat template, the assistant
role first when streaming, chat-style logprobs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from fusec.runtime.async_engine import AsyncEngine
from fusec.runtime.outputs import CompletionOutput
from fusec.runtime.sequence import Logprob
from fusec.runtime.server.errors import APIError
from fusec.runtime.server.metrics import ServerMetrics
from fusec.runtime.server.protocol import (ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
                                           ChatCompletionStreamResponse, ChatLogprobs, ChatResponseMessage,
                                           ChatStreamChoice, ChatTokenLogprob, DeltaMessage, TopLogprob,
                                           chat_template_args)
from fusec.runtime.server.serving_generate import Delta, Generation, OpenAIServingGenerate, Prompt
from fusec.runtime.server.serving_models import OpenAIServingModels
from fusec.runtime.server.tool_calls import ToolCalling, tool_calling


@dataclass
class ChatGeneration(Generation[ChatCompletionRequest]):
    tools: ToolCalling | None = None  # None: the answer is plain text


class OpenAIServingChat(OpenAIServingGenerate[ChatCompletionRequest]):
    request_id_prefix = "chatcmpl"
    chunk_type = ChatCompletionStreamResponse
    response_type = ChatCompletionResponse
    generation_type = ChatGeneration

    def __init__(self, engine: AsyncEngine, models: OpenAIServingModels, metrics: ServerMetrics,
                 tool_call_parser: str | None = None) -> None:
        super().__init__(engine, models, metrics)
        self.tool_call_parser = tool_call_parser  # set by --enable-auto-tool-choice: tool_choice "auto" works

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response | ChatCompletionResponse:
        model = self.models.resolve(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        tools = tool_calling(req, self.tool_call_parser)
        ids = await self._encode_chat(req.messages, req.add_generation_prompt,
                                      chat_template_args(req.tools, req.chat_template_kwargs))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(req.max_completion_tokens or req.max_tokens, logprobs,
                                     self.engine.engine.default_sampling)
        if tools is not None and tools.constraint is not None:
            params = dataclasses.replace(params, structured_outputs=tools.constraint)
        elif tools is not None:
            # call markers (<tool_call>, [TOOL_CALLS], <|python_tag|>) may be special tokens
            params = dataclasses.replace(params, skip_special_tokens=False)
        return await self._generate(self._new_generation(req, model, [Prompt(ids)], params, tools=tools), raw)

    def _opening_choices(self, gen: Generation[ChatCompletionRequest]) -> list[ChatStreamChoice]:
        return [ChatStreamChoice(index=k, delta=DeltaMessage(role="assistant", content=""))
                for k in range(gen.params.n)]

    def _stream_choice(self, gen: ChatGeneration, delta: Delta) -> ChatStreamChoice | None:
        out = delta.output
        logprobs = self._logprobs(delta.logprobs) if delta.logprobs is not None else None
        tools = gen.tools
        if tools is None:
            message, finish_reason = DeltaMessage(content=delta.text or None), out.finish_reason
        else:
            stream = tools.stream(delta.index)
            content, calls = stream.update(out.text, out.finished)
            if not content and not calls and logprobs is None and not out.finished:
                return None  # held back: it may be the start of a call
            message = DeltaMessage(content=content or None, tool_calls=calls or None)
            finish_reason = tools.finish_reason(out.finish_reason, stream.called)
        return ChatStreamChoice(index=delta.index, delta=message, logprobs=logprobs,
                                finish_reason=finish_reason if out.finished else None,
                                stop_reason=out.stop_reason if out.finished else None)

    def _final_choice(self, gen: ChatGeneration, index: int, prompt_index: int,
                      output: CompletionOutput) -> ChatCompletionChoice:
        tools = gen.tools
        if tools is None:
            message, finish_reason = ChatResponseMessage(content=output.text), output.finish_reason
        else:
            content, calls = tools.final(output.text)
            message = ChatResponseMessage(content=content, tool_calls=calls)
            finish_reason = tools.finish_reason(output.finish_reason, bool(calls))
        return ChatCompletionChoice(index=index, message=message,
                                    logprobs=self._logprobs(output.logprobs) if output.logprobs is not None else None,
                                    finish_reason=finish_reason, stop_reason=output.stop_reason)

    def _response_fields(self, gen: ChatGeneration) -> dict:
        return {"prompt_logprobs": self._prompt_logprobs(gen, 0)}

    def _logprobs(self, lps: list[Logprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[ChatTokenLogprob(**self._entry(lp.token_id, lp.logprob),
                                                      top_logprobs=[TopLogprob(**self._entry(t, v)) for t, v in lp.top])
                                     for lp in lps])

    def _entry(self, token_id: int, logprob: float) -> dict:
        s = self._token_str(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}
