"""`/v1/embeddings`: each input's embedding as vLLM pools a decoder-only model (the final
hidden state of its last token, L2-normalised), as floats or base64."""
from __future__ import annotations

import base64
import time
import uuid

import numpy as np

from fusec.runtime.async_engine import AsyncEngine
from fusec.runtime.sequence import PoolingParams
from fusec.runtime.server.errors import APIError
from fusec.runtime.server.metrics import ServerMetrics
from fusec.runtime.server.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from fusec.runtime.server.serving_engine import OpenAIServing
from fusec.runtime.server.serving_models import OpenAIServingModels


class OpenAIServingEmbedding(OpenAIServing):
    def __init__(self, engine: AsyncEngine, models: OpenAIServingModels, metrics: ServerMetrics) -> None:
        super().__init__(engine, models)
        self.metrics = metrics

    async def create(self, req: EmbeddingRequest) -> EmbeddingResponse:
        arrival = time.monotonic()
        model = self.models.resolve(req.model)
        if req.dimensions is not None:  # vLLM's refusal for a model without matryoshka training
            raise APIError(400, f'Model "{model}" does not support matryoshka representation, changing output '
                                f'dimensions will lead to poor results.', "dimensions")
        prompts = self._truncate(await self._prompts(req), req.truncate_prompt_tokens)
        request_id, created = f"embd-{uuid.uuid4().hex}", int(time.time())
        streams = await self._add_all(request_id, prompts, PoolingParams(), arrival)
        try:
            outputs = [await anext(s) for s in streams]  # one finished output each
        finally:
            for s in streams:
                s.abort()  # a no-op for the finished; frees the rest if one failed
        for stream, ids in zip(streams, prompts):
            self.metrics.pooled(stream.request_id, len(ids), arrival)
        data = [EmbeddingData(index=i, embedding=_encode(out.outputs.embedding, req.encoding_format))
                for i, out in enumerate(outputs)]
        tokens = sum(len(ids) for ids in prompts)
        return EmbeddingResponse(id=request_id, created=created, model=model, data=data,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    async def _prompts(self, req: EmbeddingRequest) -> list[list[int]]:
        given = self._prompt_list(req.input, "input")
        if isinstance(given[0], str):
            return await self._encode(given)
        return [list(ids) for ids in given]

    def _truncate(self, prompts: list[list[int]], keep: int | None) -> list[list[int]]:
        """truncate_prompt_tokens: each prompt's last `keep` tokens (vLLM truncates on the
        left, so the pooled last token stays)."""
        if keep is None:
            return prompts
        limit = self.models.max_model_len
        keep = limit if keep == -1 else keep
        if keep > limit:
            raise APIError(400, f"truncate_prompt_tokens ({keep}) cannot be greater than max_model_len ({limit}). "
                                f"Please select a smaller truncation size.", "truncate_prompt_tokens")
        return [ids[max(len(ids) - keep, 0):] for ids in prompts]


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's and vLLM's: the little-endian float32 bytes
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
