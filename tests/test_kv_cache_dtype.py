"""--kv-cache-dtype float16 / bfloat16: the KV cache stored in 16 bits under float32
activations (on the CPU: half the cache's memory and half its traffic a step). K and V
are rounded as the cache stores them, so the fused plans still equal the reference
interpreter of the same graph; the kernels themselves are checked per pattern in
tests/test_patterns.py (the attention examples' 16-bit caches)."""
from __future__ import annotations

import numpy as np
import pytest

from fusec.errors import InputError
from fusec.fusion.dtypes import DType
from fusec.runtime.config import EngineConfig
from fusec.runtime.sequence import SamplingParams
from helpers import engine_generate

PROMPTS = [[5, 17, 33, 2, 9, 41, 8], [3, 60, 12], [7, 7, 21, 40, 11, 2, 5, 19, 30, 1, 4]]


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gpt_neox"])
def test_fused_plans_equal_the_reference_over_a_16_bit_cache(family, kv, tiny_checkpoints):
    """Greedy tokens of the fused plans equal the reference interpreter's, both over the
    16-bit cache, across prefill, decode and GQA / q-k norms / partial rotary / sliding
    window / GPT-NeoX's attention."""
    from fusec.models.loader import load_model

    model = load_model(str(tiny_checkpoints[family]))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    config = dict(kv_cache_dtype=kv, num_kv_blocks=80, block_size=4)
    want = engine_generate(model, PROMPTS, params, "reference", **config)
    assert engine_generate(model, PROMPTS, params, "fused", **config) == want


def test_the_cache_is_16_bit_and_holds_twice_the_blocks(tiny_checkpoints):
    from fusec.models.loader import load_model
    from fusec.runtime.engine import LLMEngine

    model = load_model(str(tiny_checkpoints["llama"]))
    blocks = {}
    for kv, want in (("auto", np.float32), ("float16", np.float16), ("float32", np.float32)):  # f32 activations
        engine = LLMEngine(EngineConfig(kv_cache_dtype=kv, kv_cache_gb=0.01, int8_activations=False), model=model)
        caches = list(engine.runner.executor.kv.values())
        assert caches and {arr.dtype for arr in caches} == {np.dtype(want)}
        assert engine.runner.kv_dtype is {np.float16: DType.F16, np.float32: DType.F32}[want]
        blocks[kv] = engine.runner.num_blocks
        engine.close()
    assert blocks["auto"] == blocks["float32"] and blocks["float16"] in (2 * blocks["auto"], 2 * blocks["auto"] + 1)


def test_flag_values():
    assert EngineConfig().kv_dtype() is None  # the activations'
    assert EngineConfig(kv_cache_dtype="float16").kv_dtype() is DType.F16
    assert EngineConfig(kv_cache_dtype="bfloat16").kv_dtype() is DType.BF16
    assert EngineConfig(kv_cache_dtype="float32").kv_dtype() is DType.F32
    with pytest.raises(InputError, match="kv-cache-dtype fp8_e5m2"):
        EngineConfig(kv_cache_dtype="fp8_e5m2")


def test_mla_latent_cache_refuses_another_dtype(tiny_checkpoints):
    from fusec.models.loader import load_model
    from fusec.runtime.engine import LLMEngine

    model = load_model(str(tiny_checkpoints["deepseek_v2_lite"]))
    with pytest.raises(InputError, match="latent cache"):
        LLMEngine(EngineConfig(kv_cache_dtype="float16", num_kv_blocks=8), model=model)
    engine = LLMEngine(EngineConfig(num_kv_blocks=8), model=model)  # auto: the activation dtype
    assert engine.runner.kv_dtype is DType.F32
    engine.close()
