"""The CUDA executor and the engine's GPU path on a host-memory device double
(tests/host_cuda.py): everything but the driver, PTX and cuBLASLt, checked without a
GPU. tests/test_gpu.py runs the same paths on a real device."""
from __future__ import annotations

import numpy as np
import pytest

from host_cuda import HostMemoryCuda
from helpers import run_requests
from fusec.fusion.cache import KernelCache
from fusec.fusion.dtypes import from_storage
from fusec.fusion.interpreter import Interpreter
from fusec.kernels.registry import default_registry
from fusec.kernels.testing import relative_error
from fusec.models.loader import load_model
from fusec.models.weights import DummyWeights
from fusec.runtime.engine import EngineConfig, LLMEngine
from fusec.runtime.executor import PlanExecutor
from fusec.runtime.memory import max_dims
from fusec.runtime.model_runner import SequenceChunk, build_inputs
from fusec.runtime.sequence import SamplingParams


def decode_against_reference(model, device, crossover: int, steps: int = 6) -> PlanExecutor:
    """Prefill two sequences, then greedy decode steps, on the device and in the
    reference interpreter: logits agree every step, tokens too in f32, and so do the KV
    caches at the end."""
    graph = model.graph(4)
    ex = PlanExecutor(device, graph, model.weights, default_registry(), device.plan_options(128, crossover),
                      poison=True, max_dims=max_dims(32, 4, 128, 4))
    ex.allocate_kv(16)
    ref = Interpreter(graph, model.weights)
    ref_state = ref.new_state({"NB": 16})
    rng = np.random.default_rng(3)
    chunks = [SequenceChunk(rng.integers(0, model.config.vocab_size, n).tolist(), 0, list(blocks))
              for n, blocks in ((11, (3, 9, 1, 12, 5, 10, 4, 15)), (6, (0, 7, 14, 2, 8, 6, 11, 13)))]
    for _ in range(steps):
        inputs = build_inputs(chunks, 4)
        got = device.to_host(ex.run(inputs)["logits"])
        want = ref.run(inputs, ref_state)["logits"]
        f32 = model.dtype.value == "f32"
        assert relative_error(got, want) < (1e-4 if f32 else 3e-2)
        if f32:
            assert (np.argmax(got, axis=1) == np.argmax(want, axis=1)).all()
        for c, row in zip(chunks, want):
            c.start += len(c.token_ids)
            c.token_ids = [int(np.argmax(row))]
    # the KV caches on the "device" equal the reference's (both halves, every block written)
    for name, arr in ex.kv.items():
        got = from_storage(device.to_host(arr), graph.node(name).type.dtype)
        assert relative_error(got[:, [3, 9, 1, 0, 7, 14]], ref_state[name][:, [3, 9, 1, 0, 7, 14]]) < 3e-2
    return ex


@pytest.mark.parametrize("crossover", [64, 4], ids=["gemv", "gemm-prefill"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_cuda_executor_on_host_memory_equals_reference(crossover, dtype, tiny_checkpoints, tmp_path):
    model = load_model(str(tiny_checkpoints["qwen2"]), dtype=dtype)
    device = HostMemoryCuda(KernelCache(tmp_path))
    ex = decode_against_reference(model, device, crossover)
    gemms = ex.gemm.shapes
    if crossover == 4:  # the 17-token prefill (and its 2 logits rows) went through the GEMM
        assert {s.tokens for s in gemms} == {17, 2}  # library; the decodes did not
    else:
        assert not gemms


def test_dummy_weights_filled_on_the_device_equal_the_host_values(tiny_checkpoints, tmp_path):
    model = load_model(str(tiny_checkpoints["llama"]), dtype="bf16", load_format="dummy", seed=7)
    assert isinstance(model.weights, DummyWeights)
    device = HostMemoryCuda(KernelCache(tmp_path))
    ex = PlanExecutor(device, model.graph(4), model.weights, default_registry(), device.plan_options(128, 8))
    for name, arr in ex.weights.items():
        np.testing.assert_array_equal(device.to_host(arr), model.weights[name])
    decode_against_reference(model, device, 8, steps=3)


@pytest.fixture
def host_cuda(tmp_path):
    """A HostMemoryCuda with its own kernel cache, injected into engines as their device."""
    device = HostMemoryCuda(KernelCache(tmp_path / "kernels"))
    yield device
    device.close()


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_engine_on_the_cuda_path_equals_cpu(eager, host_cuda, tiny_checkpoints):
    engine = engine_on_cuda_equals_cpu(load_model(str(tiny_checkpoints["qwen2"])), host_cuda, eager)
    device = engine.runner.device
    if eager:
        assert device.replays == 0 and not engine.runner.graph_buckets
    else:  # decode steps replayed the captured graphs, padded to 1, 2, 4 or 8 rows
        assert engine.runner.graph_buckets == [1, 2, 4, 8] and device.replays > 10


def engine_on_cuda_equals_cpu(model, cuda_device, enforce_eager: bool = False):
    """Continuous batching, chunked prefill through the GEMM plan, prefix caching, n > 1
    with copy-on-write, penalties, logprobs and seeded sampling: the CUDA path's tokens
    equal the CPU backend's. Returns the CUDA engine."""
    rng = np.random.default_rng(1)
    shared = rng.integers(0, model.config.vocab_size, 20).tolist()
    prompts = [shared + rng.integers(0, model.config.vocab_size, int(rng.integers(1, 30))).tolist()
               for _ in range(6)]
    params = [SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5, logprobs=3),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_tokens=12, ignore_eos=True)] * 2
    results = {}
    for device in ("cpu", "cuda"):
        engine = LLMEngine(EngineConfig(device=device, max_num_batched_tokens=48, max_num_seqs=8,
                                        num_kv_blocks=64, enforce_eager=enforce_eager), model=model,
                           device=cuda_device if device == "cuda" else None)
        outputs = run_requests(engine, prompts, params)
        assert engine.blocks.all_free()
        results[device] = outputs
        engine.close()
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        assert [c.token_ids for c in cuda.outputs] == [c.token_ids for c in cpu.outputs]
        for c_cpu, c_cuda in zip(cpu.outputs, cuda.outputs):
            if c_cpu.logprobs:
                assert [r.token_id for r in c_cuda.logprobs] == [r.token_id for r in c_cpu.logprobs]
                np.testing.assert_allclose([r.logprob for r in c_cuda.logprobs],
                                           [r.logprob for r in c_cpu.logprobs], atol=1e-3)
    return engine


def test_engine_sizes_the_kv_cache_from_gpu_memory_utilization(host_cuda, tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama"]))
    engine = LLMEngine(EngineConfig(device="cuda", gpu_memory_utilization=0.5), model=model, device=host_cuda)
    free, total = engine.runner.device.memory_info()
    cfg = model.config
    per_block = 2 * cfg.num_layers * 16 * cfg.kv_size * 4
    # the KV cache took what was left of half the device, to within one block
    assert 0 <= total * 0.5 - (total - free) < per_block
    assert engine.blocks.num_blocks > 100
    engine.close()


def test_async_engine_steps_the_cuda_path_on_its_own_thread(host_cuda, tiny_checkpoints):
    """The engine thread makes the device current before its first step (the double
    refuses calls from threads without it, as the driver does)."""
    import asyncio

    from fusec.runtime.async_engine import AsyncEngine

    model = load_model(str(tiny_checkpoints["llama"]))
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=4, num_kv_blocks=32), model=model, device=host_cuda)
    offline = run_requests(engine, [[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    server = AsyncEngine(engine)

    async def generate():
        async for out in server.generate(None, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                         prompt_token_ids=[5, 6, 7, 8]):
            pass
        return out.outputs[0].token_ids

    try:
        assert asyncio.run(generate()) == offline[0].outputs[0].token_ids
    finally:
        server.shutdown()


def test_serve_on_the_cuda_path_answers_openai_clients(tmp_path, smollm2_path):
    """`fusec serve --device cuda` on the double (tests/double_serve.py): it captures its
    graphs at startup, and greedy chat and streamed completions equal the CPU server's."""
    import sys
    from pathlib import Path

    import openai
    from server_helpers import LiveServer, write_tiny_chat_model

    path = write_tiny_chat_model(tmp_path, smollm2_path)
    common = ("--model", str(path), "--served-model-name", "tiny", "--max-model-len", "256", "--max-num-seqs", "8")
    servers = {"cpu": LiveServer(*common, "--device", "cpu"),
               "cuda": LiveServer(*common, "--device", "cuda",
                                  command=[sys.executable, str(Path(__file__).with_name("double_serve.py"))])}
    answers = {}
    try:
        for name, server in servers.items():
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            chats = [c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                               max_tokens=12, temperature=0).choices[0].message.content
                     for q in ("What is the capital of France?", "Name three colors.")]
            stream = "".join(chunk.choices[0].text for chunk in c.completions.create(
                model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
            answers[name] = (chats, stream)
    finally:
        outputs = {name: server.stop() for name, server in servers.items()}
    assert answers["cuda"] == answers["cpu"]
    assert all(code == 0 for code, _ in outputs.values())
    assert "cuda backend" in outputs["cuda"][1] and "decode graphs for batches [1, 2, 4, 8]" in outputs["cuda"][1]


def test_staging_hands_out_aligned_space_in_order_until_reset():
    from fusec.runtime.backends.cuda import Staging

    rng = np.random.default_rng(3)
    staging = Staging(np.full(256, 0xA5, np.uint8))
    a = rng.standard_normal(5).astype(np.float32)  # 20 bytes
    b = rng.integers(-9, 9, (3, 4)).astype(np.int32)  # 48 bytes
    base = staging.memory.ctypes.data
    start_a, start_b = staging.reserve(a.nbytes), staging.reserve(b.nbytes)
    assert (start_a, start_b) == (0, Staging.ALIGN)
    assert (staging.write(start_a, a), staging.write(start_b, b)) == (base, base + Staging.ALIGN)
    np.testing.assert_array_equal(staging.memory[:20].view(np.float32), a)
    np.testing.assert_array_equal(staging.memory[64:112].view(np.int32).reshape(3, 4), b)
    np.testing.assert_array_equal(staging.read(start_b, np.empty((3, 4), np.int32)), b)
    assert staging.reserve(200) is None  # 128 + 200 > 256: the caller syncs first
    assert staging.used == 112  # a refused request takes nothing
    staging.reset()
    assert staging.reserve(200) == 0
