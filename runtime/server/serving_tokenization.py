"""`/tokenize` and `/detokenize`."""
from __future__ import annotations

from fusec.runtime.server.errors import APIError
from fusec.runtime.server.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse,
                                           chat_template_args)
from fusec.runtime.server.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.models.resolve(req.model)
        self._need_tokenizer()
        if req.messages is not None:
            ids = await self._encode_chat(req.messages, req.add_generation_prompt,
                                          chat_template_args(req.tools, req.chat_template_kwargs))
        elif req.prompt is not None:
            (ids,) = await self._encode([req.prompt], req.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages")
        return TokenizeResponse(count=len(ids), max_model_len=self.models.max_model_len, tokens=ids)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.models.resolve(req.model)
        self._need_tokenizer()
        vocab = self.engine.engine.model.config.vocab_size
        if any(t >= vocab for t in req.tokens):
            raise APIError(400, f"token ids must be below the vocabulary size {vocab}", "tokens")
        return DetokenizeResponse(prompt=await self._decode(req.tokens, skip_special_tokens=False))
