"""GPU checks: the same PTX kernels the host tests cover, run on a real device."""
from __future__ import annotations

import numpy as np
import pytest

from fusec.fusion.cache import KernelCache
from fusec.fusion.dtypes import DType, from_storage
from fusec.fusion.interpreter import Interpreter
from fusec.fusion.plan import PlanOptions
from fusec.kernels.examples import EXAMPLES
from fusec.kernels.registry import default_registry
from fusec.kernels.testing import TOLERANCE, random_state, random_weights, relative_error

pytestmark = pytest.mark.gpu


def _has_gpu() -> bool:
    try:
        from cuda.core import Device

        Device().set_current()
        return True
    except Exception:
        return False


if not _has_gpu():
    pytest.skip("no CUDA device", allow_module_level=True)

from fusec.runtime.backends.cuda import CudaExecutor, device_target  # noqa: E402

REGISTRY = default_registry()
GPU_PATTERNS = [p.name for p in REGISTRY if p.name != "gemm"]  # library GEMMs come with the CUDA backend


@pytest.fixture(scope="module")
def target():
    from cuda.core import Device

    return device_target(Device())


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16], ids=lambda d: d.value)
@pytest.mark.parametrize("size", [0, 1, 2])
@pytest.mark.parametrize("pattern", GPU_PATTERNS)
def test_pattern_on_gpu_equals_reference(pattern, size, dtype, target, tmp_path_factory):
    rng = np.random.default_rng([size, 7])
    ex = EXAMPLES[pattern](rng, size, dtype)
    weights, state = random_weights(ex, rng), random_state(ex, rng)
    ref_state = {k: from_storage(v, ex.graph.node(k).type.dtype).copy() for k, v in state.items()}
    want = Interpreter(ex.graph, weights).run(ex.inputs, ref_state)
    options = PlanOptions(target, max_positions=256, crossover=8)
    ex_ = CudaExecutor(ex.graph, weights, REGISTRY, options, KernelCache(tmp_path_factory.mktemp("k")), poison=True)
    plan = ex_.plan_for(ex.tokens)
    assert pattern in {launch.pattern for launch in plan.launches}
    dev_state = ex_.new_state(ex.state_dims)
    for name, arr in dev_state.items():
        arr.upload(state[name])
    got = ex_.run(ex.inputs, dev_state)
    for name, value in want.items():
        node = ex.graph.node(plan.resolve(name))
        err = relative_error(from_storage(got[name], node.type.dtype), value)
        # ex2.approx and FMA contraction on the GPU: a little looser than the host in f32
        assert err < max(TOLERANCE[dtype], 1e-4), (name, err)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_tiny_model_decode_on_gpu_equals_reference(name, dtype, target, tiny_checkpoints, tmp_path):
    """Prefill and 16 greedy decode steps of two sequences, every step in the fused-GEMV plan."""
    from fusec.models.loader import load_model
    from fusec.runtime.model_runner import SequenceChunk, build_inputs

    model = load_model(str(tiny_checkpoints[name]), dtype=dtype)
    graph = model.graph(4)
    gpu = CudaExecutor(graph, model.weights, REGISTRY, PlanOptions(target, 128, crossover=64), KernelCache(tmp_path))
    ref = Interpreter(graph, model.weights)
    gpu_state, ref_state = gpu.new_state({"NB": 16}), ref.new_state({"NB": 16})
    rng = np.random.default_rng(3)
    chunks = [SequenceChunk(rng.integers(0, model.config.vocab_size, n).tolist(), 0, list(blocks))
              for n, blocks in ((11, (3, 9, 1, 12, 5, 10, 4, 15)), (6, (0, 7, 14, 2, 8, 6, 11, 13)))]
    tokens = {"gpu": [[], []], "ref": [[], []]}
    for step in range(17):  # prefill, then 16 decode steps
        inputs = build_inputs(chunks, 4)
        logits = {"gpu": gpu.run(inputs, gpu_state)["logits"], "ref": ref.run(inputs, ref_state)["logits"]}
        assert relative_error(logits["gpu"], logits["ref"]) < (1e-4 if dtype == "f32" else 3e-2)
        for i, c in enumerate(chunks):
            for k in tokens:
                tokens[k][i].append(int(np.argmax(logits[k][i])))
            c.start += len(c.token_ids)
            c.token_ids = [tokens["ref"][i][-1]]
    if dtype == "f32":
        assert tokens["gpu"] == tokens["ref"]


def test_engine_on_gpu_equals_cpu(tiny_checkpoints):
    """The whole engine (continuous batching, prefix cache, copy-on-write for n > 1) on
    the GPU backend gives the CPU backend's greedy tokens."""
    from helpers import run_requests

    from fusec.models.loader import load_model
    from fusec.runtime.engine import EngineConfig, LLMEngine
    from fusec.runtime.sequence import SamplingParams

    model = load_model(str(tiny_checkpoints["qwen2"]))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, int(rng.integers(3, 40))).tolist() for _ in range(6)]
    params = SamplingParams(n=2, temperature=0, max_tokens=16, ignore_eos=True)
    results = {}
    for device in ("cpu", "cuda"):
        engine = LLMEngine(EngineConfig(device=device, max_num_batched_tokens=64), model=model)
        outputs = run_requests(engine, prompts, params)
        assert engine.blocks.all_free()
        engine.close()
        results[device] = [[c.token_ids for c in out.outputs] for out in outputs]
    assert results["cuda"] == results["cpu"]
