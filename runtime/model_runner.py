"""Turns a batch of sequences into graph inputs (paged-attention metadata) and runs it."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from fusec.errors import InputError
from fusec.fusion.dtypes import DType, from_storage
from fusec.fusion.plan import has_int8_dots, int8_dots_on
from fusec.models.llama import HIDDEN_ROWS
from fusec.models.loader import Model, with_int8_bands
from fusec.runtime.config import EngineConfig
from fusec.runtime.device import Device
from fusec.runtime.executor import PlanExecutor, ReferenceExecutor
from fusec.runtime.memory import MemoryUse, kv_cache_blocks, max_dims
from fusec.runtime.profile import StepProfile
from fusec.runtime.sampler import KernelSampler, SampleResult, SamplingBatch, reference_sample
from fusec.runtime.scheduler import PROMPT_LOGPROB_ROWS
from fusec.runtime.sequence import Sequence as Seq

log = logging.getLogger(__name__)


@dataclass
class SequenceChunk:
    """New tokens of one sequence for this step, after `start` tokens already in its cache."""

    token_ids: Sequence[int]
    start: int
    block_table: list[int] = field(default_factory=list)
    all_logits: bool = False  # the logits of every token, not just the last


def build_inputs(chunks: Sequence[SequenceChunk], block_size: int) -> dict[str, np.ndarray]:
    lens = [len(c.token_ids) for c in chunks]
    if not chunks or min(lens) < 1:
        raise ValueError("every chunk needs at least one token")
    qstart = np.zeros(len(chunks) + 1, dtype=np.int32)
    qstart[1:] = np.cumsum(lens)
    positions = np.concatenate([np.arange(c.start, c.start + n) for c, n in zip(chunks, lens)]).astype(np.int32)
    slots = []
    for c, n in zip(chunks, lens):
        table = np.asarray(c.block_table, dtype=np.int64)
        pos = np.arange(c.start, c.start + n)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max(len(c.block_table) for c in chunks)
    tables = np.zeros((len(chunks), width), dtype=np.int32)
    for i, c in enumerate(chunks):
        tables[i, : len(c.block_table)] = c.block_table
    rows = np.concatenate([np.arange(qstart[i], qstart[i + 1]) if c.all_logits else [qstart[i + 1] - 1]
                           for i, c in enumerate(chunks)])
    return {
        "token_ids": np.concatenate([np.asarray(c.token_ids) for c in chunks]).astype(np.int32),
        "positions": positions,
        "slot_mapping": np.concatenate(slots).astype(np.int32),
        "block_tables": tables,
        "context_lens": np.asarray([c.start + n for c, n in zip(chunks, lens)], dtype=np.int32),
        "query_start_loc": qstart,
        "logits_indices": rows.astype(np.int32),
    }


# Decode batch sizes captured as CUDA graphs (and the largest batch); a batch replays
# the smallest that holds it, padded.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ModelRunner:
    """Runs a model's graph over a paged KV cache on a device (the compiled plans), or
    without one (`device=None`: the interpreter of the unfused graph)."""

    def __init__(self, model: Model, config: EngineConfig, device: Device | None, max_model_len: int) -> None:
        self.model = model
        self.block_size = config.block_size
        self.device = device
        self.vocab = model.config.vocab_size
        self.max_sample_rows = max(1, config.max_num_seqs)
        memory: MemoryUse | None = None
        if device is None:
            graph = model.graph(config.block_size, max_model_len, config.kv_dtype())
            self.executor: PlanExecutor | ReferenceExecutor = ReferenceExecutor(graph, model.weights, (HIDDEN_ROWS,))
            self.sampler = None  # the reference samples with the kernels' numpy oracle
        else:
            from fusec.kernels.registry import default_registry

            device.sync()
            free_before, total = device.memory_info()

            tuning = self._tuning(device, model)
            crossover = config.crossover or (tuning.crossover if tuning else None)
            max_tokens = max(config.resolved_max_num_batched_tokens(max_model_len), config.max_num_seqs)
            options = device.plan_options(max_model_len, crossover)
            if config.int8_activations is not None:
                if config.int8_activations and not has_int8_dots(options.target):
                    raise InputError("--int8-activations needs a CPU with AVX-512 VNNI (it is the CPU's GEMV "
                                     "arithmetic; GPUs keep float activations)")
                options = dataclasses.replace(options, int8_activations=config.int8_activations)
            # the matrices int8 dots read banded, all in GGUF form without them (a model
            # loaded for this engine already is: load_model(int8_bands=...))
            model = self.model = with_int8_bands(model, int8_dots_on(options.target, options.int8_activations))
            graph = model.graph(config.block_size, max_model_len, config.kv_dtype())
            self.executor = PlanExecutor(device, graph, model.weights, default_registry(), options,
                                         max_dims=max_dims(max_tokens, self.max_sample_rows, max_model_len,
                                                           config.block_size, PROMPT_LOGPROB_ROWS),
                                         extra_outputs=(HIDDEN_ROWS,))
            if tuning and self.executor.gemm is not None:
                from fusec.runtime.autotune import parse_gemm_key

                for key, algo in tuning.gemm_algos.items():
                    self.executor.gemm.tuned[parse_gemm_key(key)] = bytes.fromhex(algo)
            self.sampler = KernelSampler(device, self.vocab, self.max_sample_rows)
            device.sync()
            memory = MemoryUse(free_before, device.memory_info()[0], total)
        (self.logits_name,) = graph.outputs
        self.hidden_dtype = graph.node(HIDDEN_ROWS).type.dtype
        kind = device.kind if device is not None else "cpu"
        self.num_blocks = kv_cache_blocks(config, kind, memory, self.executor.kv_bytes_per_block(), max_model_len)
        self.executor.allocate_kv(self.num_blocks)
        log.info("KV cache: %d blocks (%.2f GiB)", self.num_blocks,
                 self.num_blocks * self.executor.kv_bytes_per_block() / 2 ** 30)
        self.graph_buckets: list[int] = []
        self.capture_s = 0.0
        if device is not None and device.supports_graphs and not config.enforce_eager:
            start = time.perf_counter()
            buckets = sorted({b for b in GRAPH_BUCKETS if b < self.max_sample_rows} | {self.max_sample_rows})
            self.graph_buckets = self.executor.capture_graphs(buckets)
            self.capture_s = time.perf_counter() - start
            log.info("decode graphs for batches %s captured in %.2fs", self.graph_buckets, self.capture_s)

    @property
    def kv_dtype(self) -> DType:
        """The KV cache's element type (--kv-cache-dtype; auto: the activations')."""
        caches = [n.type.dtype for n in self.executor.graph.nodes("state")]
        return caches[0] if caches else self.hidden_dtype

    @property
    def activations_note(self) -> str:
        """What the startup line says after the activation dtype."""
        plans = getattr(self.executor, "plans", {})
        int8 = any(getattr(k, "int8_dots", False) for plan in plans.values() for k in plan.kernels())
        return " (int8 in quantized GEMVs)" if int8 else ""

    @staticmethod
    def _tuning(device: Device, model: Model):
        """`fusec autotune`'s choices for this device and model shape, if it ran."""
        from fusec.runtime.autotune import TuningStore, model_key

        tuning = TuningStore(device.cache.root).get(device.identity(), model_key(model))
        if tuning is not None:
            log.info("autotuned: crossover %d, %d GEMM algorithms", tuning.crossover, len(tuning.gemm_algos))
        return tuning

    def bind_thread(self) -> None:
        """Call on a thread before it runs steps (a GPU context is per thread)."""
        if self.device is not None:
            self.device.activate()

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy KV blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        self.executor.copy_blocks(pairs)

    def close(self) -> None:
        self.executor.close()

    def prepare(self, chunks: Sequence[SequenceChunk]) -> dict[str, np.ndarray]:
        """The graph inputs (paged-attention metadata) for a batch."""
        return build_inputs(chunks, self.block_size)

    def run(self, inputs: dict[str, np.ndarray], profile: StepProfile | None = None) -> Any:
        """Logits (float32, [rows, vocab]) where the executor keeps them (device memory,
        valid until the next run). The profile gets the executor's host work before the
        launches ("stage") apart from the launches ("forward")."""
        return self._launch(inputs, profile, extras=False)[self.logits_name]

    def run_with_hidden(self, inputs: dict[str, np.ndarray], profile: StepProfile | None = None
                        ) -> tuple[Any, np.ndarray]:
        """run()'s logits, and the final-normed hidden state of each logits row (float32,
        [rows, hidden], on the host): what embeddings pool. The step runs the gemm plan,
        which keeps those rows, whatever its size."""
        outputs = self._launch(inputs, profile, extras=True)
        hidden = outputs[HIDDEN_ROWS]
        if self.device is not None:  # the reference's values are float32 already
            hidden = from_storage(self.device.to_host(hidden), self.hidden_dtype)
        return outputs[self.logits_name], hidden

    def _launch(self, inputs: dict[str, np.ndarray], profile: StepProfile | None, extras: bool) -> dict[str, Any]:
        profile = profile or StepProfile()
        with profile.phase("stage"):
            staged = self.executor.stage(inputs, extras)
        with profile.phase("forward"):
            return self.executor.launch(staged)

    def forward(self, chunks: Sequence[SequenceChunk]) -> Any:
        """Logits of each chunk's last token, or of all its tokens where it says all_logits."""
        return self.run(self.prepare(chunks))

    def execute(self, chunks: Sequence[SequenceChunk]) -> np.ndarray:
        """forward(), as a host array."""
        return self.logits_to_host(self.forward(chunks))

    def logits_to_host(self, logits: Any) -> np.ndarray:
        return logits if self.device is None else self.device.to_host(logits)

    def sampling_batches(self, rows: Sequence[int], seqs: Sequence[Seq], end_ids: Sequence[set[int]],
                         masks: Sequence[np.ndarray | None]) -> list[SamplingBatch]:
        """Sampling tensors for seqs[i] drawing from logits row rows[i] (allowed tokens
        masks[i], None: all), in batches the sampler's buffers hold."""
        step = self.max_sample_rows
        return [SamplingBatch.build(rows[a:a + step], seqs[a:a + step], end_ids[a:a + step], self.vocab,
                                    masks[a:a + step])
                for a in range(0, len(rows), step)]

    def sample(self, logits: Any, batches: Sequence[SamplingBatch]) -> list[SampleResult]:
        if self.sampler is None:
            return [reference_sample(logits, b) for b in batches]
        return [self.sampler.sample(logits, b) for b in batches]
