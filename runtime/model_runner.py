"""Turns a batch of sequences into graph inputs (paged-attention metadata) and runs it."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import HOST
from fusec.fusion.interpreter import Interpreter
from fusec.fusion.plan import PlanOptions
from fusec.models.loader import Model
from fusec.runtime.memory import kv_blocks_for_memory, max_dims
from fusec.runtime.sampler import KernelSampler, SampleResult, SamplingBatch, reference_sample
from fusec.runtime.sequence import Sequence as Seq

log = logging.getLogger(__name__)


@dataclass
class SequenceChunk:
    """New tokens of one sequence for this step, after `start` tokens already in its cache."""

    token_ids: Sequence[int]
    start: int
    block_table: list[int] = field(default_factory=list)


def build_inputs(chunks: Sequence[SequenceChunk], block_size: int, all_logits: bool = False) -> dict[str, np.ndarray]:
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
    rows = np.arange(qstart[-1]) if all_logits else qstart[1:] - 1
    return {
        "token_ids": np.concatenate([np.asarray(c.token_ids) for c in chunks]).astype(np.int32),
        "positions": positions,
        "slot_mapping": np.concatenate(slots).astype(np.int32),
        "block_tables": tables,
        "context_lens": np.asarray([c.start + n for c, n in zip(chunks, lens)], dtype=np.int32),
        "query_start_loc": qstart,
        "logits_indices": rows.astype(np.int32),
    }


# Largest batch (tokens) the host runs through fused GEMVs: past it, BLAS GEMMs (which
# read each weight once per step) win. Measured on the SmolLM2 decode step.
HOST_CROSSOVER = 2
# The GPU's: fused GEMVs re-read the weights once per token, cuBLASLt reads them once.
# A default until `fusec autotune` measures it per GPU.
GPU_CROSSOVER = 8
# Decode batch sizes captured as CUDA graphs (and the largest batch); a batch replays
# the smallest that holds it, padded.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


BACKENDS = ("reference", "cpu", "cuda")


class ModelRunner:
    """Runs a model's graph over a paged KV cache, on one backend: "reference" (the
    interpreter of the unfused graph), "cpu" (the compiled plans on the host) or "cuda"
    (the compiled plans on a GPU, cuBLASLt for the large-batch GEMMs)."""

    def __init__(self, model: Model, num_blocks: int | None, block_size: int = 16, backend: str = "reference",
                 cache: KernelCache | None = None, max_positions: int | None = None,
                 max_batch_tokens: int = 1 << 20, max_sample_rows: int = 64, gpu_memory_utilization: float = 0.9,
                 kv_bytes_per_block: int = 0, min_kv_blocks: int = 1, enforce_eager: bool = False) -> None:
        self.model = model
        self.block_size = block_size
        graph = model.graph(block_size)
        positions = max_positions or model.config.max_position_embeddings
        if backend == "reference":
            self.executor = Interpreter(graph, model.weights)
        elif backend == "cpu":
            from fusec.kernels.registry import default_registry
            from fusec.runtime.backends.cpu import CpuExecutor

            options = PlanOptions(HOST, max_positions=positions, crossover=HOST_CROSSOVER)
            self.executor = CpuExecutor(graph, model.weights, default_registry(), options, cache)
        elif backend == "cuda":
            from fusec.kernels.registry import default_registry
            from fusec.runtime.backends.cuda import CudaDevice, CudaExecutor

            device = CudaDevice(cache)
            self.executor = CudaExecutor(device, graph, model.weights, default_registry(),
                                         device.plan_options(positions, GPU_CROSSOVER),
                                         max_dims=max_dims(max_batch_tokens, max_sample_rows, positions, block_size))
        else:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.device = getattr(self.executor, "device", None)  # where kernels run; None: the interpreter
        self.vocab = model.config.vocab_size
        self.max_sample_rows = max(1, max_sample_rows)
        # the compiled sampling kernels on the executor's device; the reference executor
        # samples with their numpy oracle
        self.sampler = None if self.device is None else KernelSampler(self.device, self.vocab, self.max_sample_rows)
        if self.device is not None:
            self._apply_tuning(model, cache)
        if num_blocks is None:  # a GPU: what is left of its share holds the KV cache
            free, total = self.device.memory_info()
            num_blocks = kv_blocks_for_memory(total, free, gpu_memory_utilization, kv_bytes_per_block, min_kv_blocks)
            log.info("KV cache: %d blocks (%.2f GiB)", num_blocks, num_blocks * kv_bytes_per_block / 2 ** 30)
        self.num_blocks = num_blocks
        self.kv_state = self.executor.new_state({"NB": num_blocks})
        self.graph_buckets: list[int] = []
        self.capture_s = 0.0
        if backend == "cuda" and not enforce_eager:
            start = time.perf_counter()
            buckets = sorted({b for b in GRAPH_BUCKETS if b < max_sample_rows} | {max_sample_rows})
            self.graph_buckets = self.executor.capture_graphs(buckets, self.kv_state)
            self.capture_s = time.perf_counter() - start
            log.info("CUDA graphs for decode batches %s captured in %.2fs", self.graph_buckets, self.capture_s)

    def bind_thread(self) -> None:
        """Call on a thread before it runs steps (a GPU context is per thread)."""
        if self.device is not None:
            self.device.activate()

    def _apply_tuning(self, model: Model, cache: KernelCache | None) -> None:
        """`fusec autotune`'s choices for this device and model shape, if it ran."""
        from fusec.runtime.autotune import TuningStore, model_key, parse_gemm_key

        tuning = TuningStore(cache.root if cache else None).get(self.device.identity(), model_key(model))
        if tuning is None:
            return
        self.executor.options = replace(self.executor.options, crossover=tuning.crossover)
        library = getattr(self.executor, "gemm", None)
        if library is not None:
            for key, algo in tuning.gemm_algos.items():
                library.tuned[parse_gemm_key(key)] = bytes.fromhex(algo)
        log.info("autotuned: crossover %d, %d GEMM algorithms", tuning.crossover, len(tuning.gemm_algos))

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy KV blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        copy = getattr(self.executor, "copy_blocks", None)
        if copy is not None:
            copy(self.kv_state, pairs)
            return
        src = [s for s, _ in pairs]
        dst = [d for _, d in pairs]
        for cache in self.kv_state.values():
            cache[:, dst] = cache[:, src]

    def close(self) -> None:
        close = getattr(self.executor, "close", None)
        if close is not None:
            close()

    def prepare(self, chunks: Sequence[SequenceChunk], all_logits: bool = False) -> dict[str, np.ndarray]:
        """The graph inputs (paged-attention metadata) for a batch."""
        return build_inputs(chunks, self.block_size, all_logits)

    def run(self, inputs: dict[str, np.ndarray]) -> Any:
        """Logits (float32, [rows, vocab]) where the executor keeps them (device memory on
        a GPU, valid until the next run)."""
        (logits,) = self.executor.run(inputs, self.kv_state).values()
        return logits

    def forward(self, chunks: Sequence[SequenceChunk], all_logits: bool = False) -> Any:
        """Logits of each chunk's last token, or of every token with all_logits."""
        return self.run(self.prepare(chunks, all_logits))

    def execute(self, chunks: Sequence[SequenceChunk], all_logits: bool = False) -> np.ndarray:
        """forward(), as a host array."""
        logits = self.forward(chunks, all_logits)
        return logits if self.device is None else self.device.to_host(logits)

    def sampling_batches(self, rows: Sequence[int], seqs: Sequence[Seq], end_ids: Sequence[set[int]]
                         ) -> list[SamplingBatch]:
        """Sampling tensors for seqs[i] drawing from logits row rows[i], in batches the
        sampler's buffers hold."""
        step = self.max_sample_rows
        return [SamplingBatch.build(rows[a:a + step], seqs[a:a + step], end_ids[a:a + step], self.vocab)
                for a in range(0, len(rows), step)]

    def sample(self, logits: Any, batches: Sequence[SamplingBatch]) -> list[SampleResult]:
        if self.sampler is None:
            return [reference_sample(logits, b) for b in batches]
        return [self.sampler.sample(logits, b) for b in batches]
