"""`/v1/completions`: prompts as text or token ids, echo, completion-style logprobs."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from fusec.runtime.outputs import CompletionOutput
from fusec.runtime.sequence import Logprob
from fusec.runtime.server.errors import APIError
from fusec.runtime.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                           CompletionResponse, CompletionStreamResponse)
from fusec.runtime.server.serving_generate import Delta, Generation, OpenAIServingGenerate, Prompt


class OpenAIServingCompletion(OpenAIServingGenerate[CompletionRequest]):
    request_id_prefix = "cmpl"
    chunk_type = CompletionStreamResponse
    response_type = CompletionResponse

    async def create(self, req: CompletionRequest, raw: Request) -> Response | CompletionResponse:
        model = self.models.resolve(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported: ask for prompt_logprobs (vLLM's field)", "echo")
        prompts = await self._prompts(req)
        params = req.sampling_params(req.max_tokens, req.logprobs, self.engine.engine.default_sampling)
        return await self._generate(self._new_generation(req, model, prompts, params), raw)

    async def _prompts(self, req: CompletionRequest) -> list[Prompt]:
        prompt = self._prompt_list(req.prompt, "prompt")
        if isinstance(prompt[0], str):
            return [Prompt(ids, text) for text, ids in zip(prompt, await self._encode(prompt))]
        prompts = [Prompt(list(ids)) for ids in prompt]
        if req.echo:  # echo needs the text of token-id prompts
            for p in prompts:
                p.text = await self._decode(p.token_ids)
        return prompts

    def _stream_choice(self, gen: Generation[CompletionRequest], delta: Delta) -> CompletionChoice:
        out = delta.output
        text = delta.text
        if delta.first and gen.request.echo:
            text = gen.prompts[delta.prompt_index].text + text
        logprobs = self._logprobs(delta.logprobs, delta.text_offset) if delta.logprobs is not None else None
        return CompletionChoice(index=delta.index, text=text, logprobs=logprobs,
                                finish_reason=out.finish_reason if out.finished else None,
                                stop_reason=out.stop_reason if out.finished else None)

    def _final_choice(self, gen: Generation[CompletionRequest], index: int, prompt_index: int,
                      output: CompletionOutput) -> CompletionChoice:
        prefix = gen.prompts[prompt_index].text if gen.request.echo else ""
        logprobs = self._logprobs(output.logprobs, len(prefix)) if output.logprobs is not None else None
        return CompletionChoice(index=index, text=prefix + output.text, logprobs=logprobs,
                                finish_reason=output.finish_reason, stop_reason=output.stop_reason,
                                prompt_logprobs=self._prompt_logprobs(gen, prompt_index))

    def _logprobs(self, lps: list[Logprob], offset: int) -> CompletionLogprobs:
        tokens = [self._token_str(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in lps],
                                  top_logprobs=[{self._token_str(t): v for t, v in lp.top} for lp in lps],
                                  text_offset=offsets)
