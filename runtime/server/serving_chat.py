"""`/v1/chat/completions`: messages through the model's chat template, the assistant
role first when streaming, chat-style logprobs."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from fusec.runtime.outputs import CompletionOutput
from fusec.runtime.sequence import Logprob
from fusec.runtime.server.errors import APIError
from fusec.runtime.server.protocol import (ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
                                           ChatCompletionStreamResponse, ChatLogprobs, ChatResponseMessage,
                                           ChatStreamChoice, ChatTokenLogprob, DeltaMessage, TopLogprob,
                                           chat_template_args)
from fusec.runtime.server.serving_generate import Delta, Generation, OpenAIServingGenerate, Prompt


class OpenAIServingChat(OpenAIServingGenerate[ChatCompletionRequest]):
    request_id_prefix = "chatcmpl"
    chunk_type = ChatCompletionStreamResponse
    response_type = ChatCompletionResponse

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response | ChatCompletionResponse:
        model = self.models.resolve(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        if req.tools and req.tool_choice != "none":
            # tool calls are not parsed from the output yet: refuse rather than answer in prose
            raise APIError(400, "tool calling is not supported yet; tool_choice \"none\" renders the tools into "
                                "the prompt and answers in text", "tool_choice")
        if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        ids = await self._encode_chat(req.messages, req.add_generation_prompt,
                                      chat_template_args(req.tools, req.chat_template_kwargs))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(req.max_completion_tokens or req.max_tokens, logprobs)
        return await self._generate(self._new_generation(req, model, [Prompt(ids)], params), raw)

    def _opening_choices(self, gen: Generation[ChatCompletionRequest]) -> list[ChatStreamChoice]:
        return [ChatStreamChoice(index=k, delta=DeltaMessage(role="assistant", content=""))
                for k in range(gen.params.n)]

    def _stream_choice(self, gen: Generation[ChatCompletionRequest], delta: Delta) -> ChatStreamChoice:
        out = delta.output
        return ChatStreamChoice(index=delta.index, delta=DeltaMessage(content=delta.text or None),
                                logprobs=self._logprobs(delta.logprobs) if delta.logprobs is not None else None,
                                finish_reason=out.finish_reason if out.finished else None,
                                stop_reason=out.stop_reason if out.finished else None)

    def _final_choice(self, gen: Generation[ChatCompletionRequest], index: int, prompt_index: int,
                      output: CompletionOutput) -> ChatCompletionChoice:
        return ChatCompletionChoice(index=index, message=ChatResponseMessage(content=output.text),
                                    logprobs=self._logprobs(output.logprobs) if output.logprobs is not None else None,
                                    finish_reason=output.finish_reason, stop_reason=output.stop_reason)

    def _logprobs(self, lps: list[Logprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[ChatTokenLogprob(**self._entry(lp.token_id, lp.logprob),
                                                      top_logprobs=[TopLogprob(**self._entry(t, v)) for t, v in lp.top])
                                     for lp in lps])

    def _entry(self, token_id: int, logprob: float) -> dict:
        s = self._token_str(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}
