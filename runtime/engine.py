"""LLMEngine: the synchronous core. `step()` = schedule -> batch -> execute (structured-
output masks computed meanwhile) -> sample -> update, detokenize, check stops, finish."""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from concurrent.futures import Future
from typing import Sequence as Seq

import numpy as np

from fusec.errors import InputError
from fusec.models.chat_template import load_chat_template
from fusec.models.detokenizer import IncrementalDetokenizer
from fusec.models.generation_config import default_sampling, eos_token_ids
from fusec.models.loader import Model, load_model
from fusec.models.tokenizer import Tokenizer
from fusec.runtime.config import EngineConfig
from fusec.runtime.device import Device, make_device, resolve_device
from fusec.runtime.block_manager import BlockManager
from fusec.runtime.model_runner import ModelRunner, SequenceChunk
from fusec.runtime.outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestMetrics,
                                   RequestOutput)
from fusec.runtime.profile import StepProfile
from fusec.runtime.sampler import prompt_logprobs, token_bitmask
from fusec.runtime.scheduler import Scheduler
from fusec.runtime.sequence import Logprob, PoolingParams, SamplingParams, Sequence
from fusec.runtime.structured_output import GrammarCompiler

log = logging.getLogger(__name__)


class NonFiniteValues(RuntimeError):
    """A step met NaN or infinite logits (to sample from) or hidden states (to pool into
    an embedding): the model's fault, not the requests'. Raised by step() once the rest of
    the step is done; the failed requests are already gone from the engine, and `outputs`
    is what the step made for the others."""

    def __init__(self, request_ids: list[str], outputs: list) -> None:
        super().__init__("the model produced non-finite values (NaN/inf): its weights may be corrupt")
        self.request_ids, self.outputs = request_ids, outputs


@dataclass
class EngineStats:
    prefilled_tokens: int = 0  # prompt tokens of requests whose prefill finished (vLLM's prompt_tokens)
    prefilled_cached_tokens: int = 0  # of those, read from the prefix cache instead of computed
    computed_tokens: int = 0  # tokens actually run through the model (recompute included)
    generated_tokens: int = 0
    steps: int = 0


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    texts: list[str]
    metrics: RequestMetrics
    keep: int  # the n returned: fewer than len(seqs) under best_of
    want_logprobs: bool  # the caller asked for logprobs (best_of computes them regardless)
    prompt_logprobs: list[Logprob | None] | None = None  # filled as the prompt's chunks run
    finished_reported: bool = False


class LLMEngine:
    """`device` runs the compiled plans (made from config.device when not given: tests
    inject a double); the reference executor needs none."""

    def __init__(self, config: EngineConfig, model: Model | None = None, device: Device | None = None) -> None:
        self.config = config
        if config.executor == "reference":
            if config.device == "cuda" or device is not None:
                raise InputError("the reference executor runs on the CPU; use --device cpu")
            kind = "cpu"
        else:
            kind = device.kind if device is not None else resolve_device(config.device)
        self.device = kind
        self.model = model or load_model(config.model, dtype=config.dtype, load_format=config.load_format,
                                         quantization=config.quantization, seed=config.seed, device=kind,
                                         int8_bands=config.executor != "reference" and config.int8_dots(kind))
        cfg = self.model.config
        self.tokenizer = self._tokenizer(config)
        # what a request that leaves a sampling field unset gets (--generation-config)
        self.default_sampling = default_sampling(config.generation_config, self.model.path,
                                                 config.override_generation_config)
        if config.trust_remote_code:
            log.info("--trust-remote-code: fusec runs no code from model repositories; the flag changes nothing")
        self.max_model_len = config.resolved_max_model_len(cfg.max_position_embeddings)
        self._owns_device = device is None and config.executor != "reference"
        if self._owns_device:
            device = make_device(kind)
        try:
            self.runner = ModelRunner(self.model, config, device, self.max_model_len)
        except BaseException:
            if self._owns_device:
                device.close()
            raise
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs,
                                   max(config.resolved_max_num_batched_tokens(self.max_model_len), 1),
                                   config.enable_chunked_prefill)
        self.end_ids: set[int] = set(cfg.eos_token_ids) | {
            i for i in eos_token_ids(self.model.path) if i < cfg.vocab_size}
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.end_ids.add(self.tokenizer.eos_token_id)
        self.grammars = (GrammarCompiler(self.tokenizer.backend.to_str(), cfg.vocab_size, self.end_ids)
                         if self.tokenizer is not None else None)
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self.profile = StepProfile()

    def _tokenizer(self, config: EngineConfig) -> Tokenizer | None:
        """The model's tokenizer, or --tokenizer's, with --chat-template's template."""
        tok = Tokenizer.from_path(config.tokenizer) if config.tokenizer else self.model.tokenizer
        if config.chat_template is None:
            return tok
        if tok is None:
            raise InputError("--chat-template needs a tokenizer (the model has none: give --tokenizer)")
        tok = copy.copy(tok)  # the model's own tokenizer may be shared by other engines
        tok.chat_template = load_chat_template(config.chat_template)
        return tok

    # -- requests ---------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer: pass prompt token ids")
        return self.tokenizer.encode(prompt)

    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams | PoolingParams,
                    prompt_token_ids: Seq[int] | None = None, arrival: float | None = None) -> None:
        if request_id in self.requests:
            raise InputError(f"duplicate request id {request_id!r}")
        if isinstance(params, PoolingParams):
            self._add_pooling(request_id, prompt, params, prompt_token_ids, arrival)
            return
        keep, want_logprobs = params.n, params.logprobs is not None
        if params.best_of is not None and params.best_of > params.n:
            # run best_of completions, each scoring its tokens; the n best are returned
            params = dataclasses.replace(params, n=params.best_of, best_of=None, logprobs=params.logprobs or 0)
        limit = self.config.max_logprobs
        for kind, asked in (("sample", params.logprobs), ("prompt", params.prompt_logprobs)):
            if asked is not None and asked > limit:
                raise InputError(f"Requested {kind} logprobs of {asked}, which is greater than max allowed: {limit}")
        if params.n > self.scheduler.max_num_seqs:
            raise InputError(f"n = {params.n} is more than --max-num-seqs {self.scheduler.max_num_seqs}: a request's "
                             f"completions run together")
        ids = self._prompt_ids(prompt, prompt_token_ids)
        params = self._cap_max_tokens(params, len(ids))
        vocab = self.model.config.vocab_size
        wanted = len(ids) + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise InputError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {wanted} tokens ({len(ids)} in the prompt, "
                             f"{params.max_tokens or 1} in the completion). Please reduce the length.")
        max_len = len(ids) + params.max_tokens if params.max_tokens else self.max_model_len
        now = time.monotonic() if arrival is None else arrival
        seqs = [Sequence(request_id, i, ids, params, now, max_len) for i in range(params.n)]
        for name, listed in (("logit_bias", params.logit_bias or {}),
                             ("allowed_token_ids", params.allowed_token_ids or [])):
            if any(not 0 <= t < vocab for t in listed):
                raise InputError(f"{name}: token ids must be in [0, {vocab})")
        if params.allowed_token_ids:
            allowed = token_bitmask(params.allowed_token_ids, vocab)
            for seq in seqs:
                seq.allowed_mask = allowed
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise InputError("structured outputs need the model's tokenizer")
            for seq in seqs:
                seq.matcher = self.grammars.matcher(params.structured_outputs)
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens) if self.tokenizer else None
                  for _ in seqs]
        self.requests[request_id] = _Request(request_id, prompt, ids, params, seqs, detoks, [""] * params.n,
                                             RequestMetrics(now), keep, want_logprobs,
                                             [None] * len(ids) if params.prompt_logprobs is not None else None)
        self.scheduler.add(seqs[0])  # the other n - 1 fork from it once its prompt is in the cache

    def _cap_max_tokens(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        """The generation config's max_new_tokens caps every request (vLLM's rule); a
        request that set no max_tokens gets it, or what the context leaves if less."""
        cap = self.default_sampling.get("max_tokens")
        if cap is None or (params.max_tokens is not None and params.max_tokens <= cap):
            return params
        room = max(self.max_model_len - prompt_len, 1)
        capped = cap if params.max_tokens else min(cap, room)
        return dataclasses.replace(params, max_tokens=capped, min_tokens=min(params.min_tokens, capped))

    def _prompt_ids(self, prompt: str | None, prompt_token_ids: Seq[int] | None) -> list[int]:
        ids = list(prompt_token_ids) if prompt_token_ids is not None else self.tokenize(prompt or "")
        if not ids:
            raise InputError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InputError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def _add_pooling(self, request_id: str, prompt: str | None, params: PoolingParams,
                     prompt_token_ids: Seq[int] | None, arrival: float | None) -> None:
        """An embedding request: one sequence that ends once its prompt is computed."""
        ids = self._prompt_ids(prompt, prompt_token_ids)
        if len(ids) > self.max_model_len:
            raise InputError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {len(ids)} tokens in the input for embedding generation. Please reduce "
                             f"the length of the input.")
        now = time.monotonic() if arrival is None else arrival
        # the scheduler reads n and prompt_logprobs from a sequence's SamplingParams: the
        # defaults mean one sequence, no prompt scoring
        seq = Sequence(request_id, 0, ids, SamplingParams(), now, len(ids))
        seq.pooling = params
        self.requests[request_id] = _Request(request_id, prompt, ids, seq.params, [seq], [None], [""],
                                             RequestMetrics(now), 1, False)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks. Its final output (what it has, finish_reason
        "abort"), or None when it is not running or is an embedding request (no partial answer)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        if req.seqs[0].pooling is not None:
            del self.requests[request_id]
            return None
        return self._output(req, time.monotonic())  # finished: it lets go of the request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        prof = self.profile
        with prof.phase("schedule"):
            sched = self.scheduler.schedule()
            if sched.copies:
                self.runner.copy_blocks(sched.copies)
            if not sched.chunks:
                if self.scheduler.has_work():
                    raise RuntimeError("scheduler made no progress")  # admission checks make this unreachable
                return []
        self.stats.steps += 1
        prof.steps += 1
        scheduled_at = time.monotonic()
        for c in sched.chunks:  # a request's queue time ends when it is first scheduled (vLLM's)
            req = self.requests.get(c.seq.request_id)
            if req is not None and req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = scheduled_at
        with prof.phase("prepare"):
            inputs = self.runner.prepare([SequenceChunk(c.seq.tokens[c.start:c.start + c.num_tokens], c.start,
                                                        c.block_table, c.all_logits) for c in sched.chunks])
            # the logits row of each chunk's last token
            last_rows = np.searchsorted(inputs["logits_indices"], inputs["query_start_loc"][1:] - 1)
            done = [(int(last_rows[k]), c.seq) for k, c in enumerate(sched.chunks) if c.completes]
            pooled = [(row, seq) for row, seq in done if seq.pooling is not None]
            rows = [row for row, seq in done if seq.pooling is None]
            sampling = [seq for _, seq in done if seq.pooling is None]
            masks = self._masks_async(sampling)  # on llguidance's threads while the forward runs
        if pooled:  # embeddings read the final-normed rows the LM head reads
            logits, hidden = self.runner.run_with_hidden(inputs, prof)
        else:
            logits, hidden = self.runner.run(inputs, prof), None
        with prof.phase("postprocess"):
            now = time.monotonic()
            if any(c.all_logits for c in sched.chunks):
                self._score_prompts(logits, sched.chunks, last_rows)
            self.scheduler.update_after_step(sched)
            self.stats.computed_tokens += sched.num_tokens
            for c in sched.chunks:
                if c.completes and c.seq.index == 0 and not c.seq.output_ids:  # a prompt is in, once per request
                    self.stats.prefilled_tokens += c.seq.num_prompt_tokens
                    self.stats.prefilled_cached_tokens += c.seq.num_cached
            pooled_outs = [self._finish_pooling(seq, hidden[row]) for row, seq in pooled]
            embedded = [out for out in pooled_outs if out is not None]
            failed = [seq.request_id for (_, seq), out in zip(pooled, pooled_outs) if out is None]
        if not sampling:
            if failed:
                log.error("non-finite hidden states for requests %s: the model's weights may be corrupt",
                          ", ".join(failed))
                raise NonFiniteValues(failed, embedded)
            return embedded
        tokens, records, nonfinite = self._sample(logits, rows, sampling, masks)
        with prof.phase("postprocess"):
            failed += list(dict.fromkeys(seq.request_id for seq, bad in zip(sampling, nonfinite) if bad))
            for request_id in failed:
                self.abort_request(request_id)
            touched: dict[str, _Request] = {}
            for row, seq, token, record in zip(rows, sampling, tokens, records):
                req = self.requests.get(seq.request_id)
                if req is None:  # failed above
                    continue
                touched[req.request_id] = req
                self._append(req, seq, token, record, now)
                if seq.index == 0 and len(seq.output_ids) == 1 and req.params.n > 1:
                    self._fork_children(req, seq, logits, row, now)
            outputs = embedded + [self._output(req, now) for req in touched.values()]
        if failed:
            log.error("non-finite logits or hidden states for requests %s: the model's weights may be corrupt",
                      ", ".join(failed))
            raise NonFiniteValues(failed, outputs)
        return outputs

    def _finish_pooling(self, seq: Sequence, hidden: np.ndarray) -> EmbeddingRequestOutput | None:
        """An embedding request whose prompt is computed: its last token's final hidden
        state (vLLM's LAST pooling), L2-normalised unless asked not to; None when that
        state is not finite (the request fails). Its blocks go back now (the prefix cache
        keeps its full ones)."""
        self.scheduler.finish(seq, "stop")
        req = self.requests.pop(seq.request_id)
        vector = hidden.astype(np.float32)
        if not np.isfinite(vector).all():
            return None
        if seq.pooling.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)  # torch's F.normalize, as vLLM
        return EmbeddingRequestOutput(req.request_id, EmbeddingOutput(vector.tolist()), req.prompt_ids)

    def _score_prompts(self, logits, chunks, last_rows: np.ndarray) -> None:
        """prompt_logprobs: each scored chunk's rows give the logprobs of the prompt tokens
        that follow them."""
        host = self.runner.logits_to_host(logits)
        for chunk, last in zip(chunks, last_rows):
            req = self.requests.get(chunk.seq.request_id)
            if not chunk.all_logits or req is None or req.prompt_logprobs is None:
                continue
            prompt = req.prompt_ids
            m = min(chunk.num_tokens, len(prompt) - 1 - chunk.start)  # positions with a next prompt token
            if m <= 0:
                continue
            first = int(last) - chunk.num_tokens + 1
            scored = prompt_logprobs(host[first:first + m], prompt[chunk.start + 1:chunk.start + 1 + m],
                                     req.params.prompt_logprobs or 0)
            req.prompt_logprobs[chunk.start + 1:chunk.start + 1 + m] = scored

    def _masks_async(self, seqs: list[Sequence]) -> Future | None:
        """The constrained sequences' allowed-token bitmasks, being computed."""
        matchers = [s.matcher for s in seqs if s.matcher is not None]
        return self.grammars.fill_masks_async(matchers) if matchers and self.grammars else None

    @staticmethod
    def _mask_rows(seqs: list[Sequence], masks: Future | None) -> list[np.ndarray | None]:
        """Each sequence's allowed tokens (its grammar's mask row and its allowed_token_ids),
        None for a free sequence."""
        rows = iter(masks.result() if masks is not None else ())
        out: list[np.ndarray | None] = []
        for s in seqs:
            grammar = next(rows) if s.matcher is not None else None
            if s.allowed_mask is not None:
                grammar = s.allowed_mask if grammar is None else grammar & s.allowed_mask
            out.append(grammar)
        return out

    def _sample(self, logits, rows: list[int], seqs: list[Sequence], masks: Future | None
                ) -> tuple[list[int], list, list[bool]]:
        """The next token of seqs[i] from logits row rows[i], its logprob record, and
        whether that row's logits were not finite."""
        with self.profile.phase("prepare"):
            batches = self.runner.sampling_batches(rows, seqs, [self.end_ids] * len(seqs),
                                                   self._mask_rows(seqs, masks))
        with self.profile.phase("sample"):
            results = self.runner.sample(logits, batches)
        tokens, records, nonfinite = [], [], []
        for batch, result in zip(batches, results):
            tokens += result.tokens.tolist()
            records += result.records(batch)
            nonfinite += result.nonfinite(batch).tolist()
        return tokens, records, nonfinite

    def _fork_children(self, req: _Request, parent: Sequence, logits, row: int, now: float) -> None:
        children = req.seqs[1:]
        for child in children:
            self.scheduler.fork(parent, child)
        # the parent's row was finite: the children draw from it too
        tokens, records, _ = self._sample(logits, [row] * len(children), children, self._masks_async(children))
        for child, token, record in zip(children, tokens, records):
            self._append(req, child, token, record, now)

    def _append(self, req: _Request, seq: Sequence, token: int, record, now: float) -> None:
        if seq.finished:
            return
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            # only a grammar that allows nothing gets here (its mask left no token)
            log.error("request %s: the structured-output grammar rejected token %d: %s", req.request_id, token,
                      seq.matcher.get_error())
            self.scheduler.finish(seq, "stop")
            return
        seq.append_token(token)
        self.stats.generated_tokens += 1
        if record is not None:
            seq.logprobs.append(record)
        if seq.first_token_time is None:
            seq.first_token_time = now
            req.metrics.first_token_time = req.metrics.first_token_time or now
            req.metrics.num_cached_tokens = max(req.metrics.num_cached_tokens, seq.num_cached)
        req.metrics.last_token_time = now
        seq.token_times.append(now)
        p = seq.params
        reason: tuple[str, int | str | None] | None = None
        if not p.ignore_eos and token in self.end_ids and len(seq.output_ids) > p.min_tokens - 1:
            reason = ("stop", None)
        elif token in p.stop_token_ids and len(seq.output_ids) >= p.min_tokens:
            reason = ("stop", token)
        detok = req.detoks[seq.index]
        new_from = 0
        if detok is not None and reason is None:  # the token that stops a sequence is not text (vLLM's rule)
            new_from = len(detok.text)
            detok.push(token)
            req.texts[seq.index] = detok.text
        if reason is None and p.stop and detok is not None and len(seq.output_ids) >= p.min_tokens:
            hit = self._find_stop(detok.text, p.stop, new_from)
            if hit is not None:
                at, stop = hit
                req.texts[seq.index] = detok.text[:at + (len(stop) if p.include_stop_str_in_output else 0)]
                reason = ("stop", stop)
        if reason is None and seq.matcher is not None and seq.matcher.is_stopped():
            reason = ("stop", None)  # the constraint is complete: only the end token could follow
        if reason is None and (len(seq.output_ids) >= (p.max_tokens or 1 << 62) or len(seq) >= seq.max_len):
            reason = ("length", None)
        if reason is not None:
            self.scheduler.finish(seq, *reason)

    @staticmethod
    def _find_stop(text: str, stops: list[str], new_from: int) -> tuple[int, str] | None:
        """The earliest stop string that ends inside the newly added text."""
        best: tuple[int, str] | None = None
        for stop in stops:
            at = text.find(stop, max(0, new_from - len(stop) + 1))
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _output(self, req: _Request, now: float) -> RequestOutput:
        finished = all(s.finished for s in req.seqs)
        hold = max((len(s) for s in req.params.stop), default=1) - 1  # a stop string may still be forming
        outs = []
        for seq, text in zip(req.seqs, req.texts):
            if not seq.finished and hold:
                text = text[:max(0, len(text) - hold)]
            lps = seq.logprobs if req.params.logprobs is not None else None
            outs.append(CompletionOutput(seq.index, text, list(seq.output_ids),
                                         sum(l.logprob for l in lps) if lps else None, lps,
                                         seq.finish_reason, seq.stop_reason))
        if req.keep < len(outs):
            outs = self._best(outs, req) if finished else []  # best_of: nothing to show until all are done
        if finished:
            req.metrics.finished_time = now
            self.requests.pop(req.request_id, None)
        # a copy: the consumer reads it on another thread while this one keeps stamping
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished,
                             dataclasses.replace(req.metrics), req.prompt_logprobs)

    @staticmethod
    def _best(outs: list[CompletionOutput], req: _Request) -> list[CompletionOutput]:
        """best_of: the req.keep completions of highest cumulative logprob, renumbered."""
        ranked = sorted(outs, key=lambda o: -o.cumulative_logprob if o.cumulative_logprob is not None
                        else float("inf"))[:req.keep]
        return [dataclasses.replace(o, index=k, logprobs=o.logprobs if req.want_logprobs else None,
                                    cumulative_logprob=o.cumulative_logprob if req.want_logprobs else None)
                for k, o in enumerate(ranked)]

    def close(self) -> None:
        if self.grammars is not None:
            self.grammars.close()
        self.runner.close()
        if self._owns_device:
            self.runner.device.close()
