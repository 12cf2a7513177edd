"""The offline Python API, in vLLM's shape: LLM(...).generate(...), .chat(...) and .embed(...)."""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence as Seq

from tqdm import tqdm

from fusec.errors import InputError
from fusec.runtime.engine import EngineConfig, LLMEngine
from fusec.runtime.outputs import EmbeddingRequestOutput, RequestOutput
from fusec.runtime.sequence import PoolingParams, SamplingParams

Messages = Seq[Mapping[str, Any]]


class LLM:
    """`LLM(model=None)` loads the default model. Keyword arguments are EngineConfig's
    (or pass a whole `config`)."""

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **kwargs: Any) -> None:
        if config is not None and (model is not None or kwargs):
            raise InputError("give either a config or model and EngineConfig keyword arguments")
        self.engine = LLMEngine(config or EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 prompt_token_ids: Seq[Seq[int]] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Completions for each prompt (text, or token ids), in the order given."""
        items = self._items(prompts, prompt_token_ids)
        # unset: the model's generation config defaults (--generation-config), as vLLM's LLM;
        # its max_tokens is a cap the engine applies to every request
        defaults = {k: v for k, v in self.engine.default_sampling.items() if k != "max_tokens"}
        params = sampling_params or SamplingParams(**defaults)
        per = list(params) if isinstance(params, (list, tuple)) else [params] * len(items)
        if len(per) != len(items):
            raise InputError("give one SamplingParams, or one per prompt")
        return self._run([self._add(text, tokens, p) for (text, tokens), p in zip(items, per)], use_tqdm)

    def embed(self, prompts: str | Seq[str] | None = None, pooling_params: PoolingParams | None = None,
              prompt_token_ids: Seq[Seq[int]] | None = None, use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """The embedding of each prompt (text, or token ids), in the order given: vLLM's
        pooling for a decoder-only model, the final hidden state of its last token,
        L2-normalised."""
        params = pooling_params or PoolingParams()
        return self._run([self._add(text, tokens, params) for text, tokens in self._items(prompts, prompt_token_ids)],
                         use_tqdm)

    @staticmethod
    def _items(prompts: str | Seq[str] | None, prompt_token_ids: Seq[Seq[int]] | None
               ) -> list[tuple[str | None, Seq[int] | None]]:
        """(text, token ids) of each prompt, one of them None."""
        if prompt_token_ids is not None:
            return [(None, ids) for ids in prompt_token_ids]
        if prompts is None:
            raise InputError("give prompts or prompt_token_ids")
        return [(p, None) for p in ([prompts] if isinstance(prompts, str) else prompts)]

    def _add(self, text: str | None, tokens: Seq[int] | None, params: SamplingParams | PoolingParams) -> str:
        rid = str(next(self._ids))
        self.engine.add_request(rid, text, params, prompt_token_ids=tokens)
        return rid

    def chat(self, messages: Messages | Seq[Messages], sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Completions of one conversation (a list of messages) or of several."""
        tok = self.engine.tokenizer
        if tok is None:
            raise InputError("this model has no tokenizer")
        convs = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        token_ids = [tok.encode_chat(c, add_generation_prompt) for c in convs]
        return self.generate(prompt_token_ids=token_ids, sampling_params=sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list:
        done: dict[str, RequestOutput | EmbeddingRequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generating", unit="req", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[r] for r in request_ids]
