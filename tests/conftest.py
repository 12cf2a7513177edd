"""Shared fixtures: tiny random HF checkpoints written by transformers itself, and the
default model. The HF oracle (torch + transformers) is imported only here and in tests."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Kernel artifacts go to a fresh cache per test session, never the user's ~/.cache/fusec.
os.environ["FUSEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusec-test-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class TinySpec:
    name: str
    arch: str
    kwargs: dict


# Odd sizes everywhere; between them they cover GQA (and MQA), tied and untied
# embeddings, qkv bias, Llama-3 rope scaling, an explicit head_dim and a sliding window.
TINY_SPECS = [
    TinySpec("llama", "llama", dict(
        vocab_size=301, hidden_size=72, intermediate_size=136, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    TinySpec("mistral", "mistral", dict(
        vocab_size=257, hidden_size=80, intermediate_size=150, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=128,
        tie_word_embeddings=True, sliding_window=7, rms_norm_eps=1e-6)),
    TinySpec("qwen2", "qwen2", dict(
        vocab_size=311, hidden_size=60, intermediate_size=98, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # q/k head norms; head_dim 24 is not hidden / heads (14)
    TinySpec("qwen3", "qwen3", dict(
        vocab_size=263, hidden_size=56, intermediate_size=100, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
        tie_word_embeddings=True, rms_norm_eps=1e-6, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # LongRoPE (short factors up to 64 positions, long past them; attention factor from
    # 256 / 64), partial rotary (12 of 16 dims), sliding window
    TinySpec("phi3", "phi3", dict(
        vocab_size=271, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=64, partial_rotary_factor=0.75, sliding_window=9,
        tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.5],
                         "long_factor": [1.5, 2.5, 4.0, 6.0, 9.0, 14.0]})),
    # GeGLU, (1 + w) norms, embeddings times sqrt(hidden), head_dim 20 != hidden / heads
    TinySpec("gemma", "gemma", dict(
        vocab_size=241, hidden_size=48, intermediate_size=104, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=20, max_position_embeddings=128,
        tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Gemma 2: sandwich norms, soft-capped scores (small cap: it bites) and logits,
    # query_pre_attn_scalar != head_dim, a sliding window on layers 0 and 2
    TinySpec("gemma2", "gemma2", dict(
        vocab_size=251, hidden_size=56, intermediate_size=92, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=18, max_position_embeddings=128,
        tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
        sliding_window=6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # LayerNorms with biases, a quarter of each head turned by RoPE, qkv bias
    TinySpec("stablelm", "stablelm", dict(
        vocab_size=233, hidden_size=64, intermediate_size=120, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, layer_norm_eps=1e-5, use_qkv_bias=True, partial_rotary_factor=0.25,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
    # StableLM's parallel-residual variant: one LayerNorm feeds attention and MLP
    TinySpec("stablelm_par", "stablelm", dict(
        vocab_size=233, hidden_size=64, intermediate_size=120, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, layer_norm_eps=1e-5, use_qkv_bias=False, use_parallel_residual=True,
        partial_rotary_factor=0.25,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
    # parallel residual, non-gated GELU MLP with biases, per-head interleaved q|k|v, partial rotary
    TinySpec("gpt_neox", "gpt_neox", dict(
        vocab_size=257, hidden_size=72, intermediate_size=136, num_hidden_layers=2,
        num_attention_heads=6, max_position_embeddings=128, layer_norm_eps=1e-5, use_parallel_residual=True,
        attention_bias=True, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # one bias-free LayerNorm feeding attention and MLP in parallel, GPT-J (interleaved) rotary, logit scale,
    # per-head q/k LayerNorms
    TinySpec("cohere", "cohere", dict(
        vocab_size=229, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, layer_norm_eps=1e-5,
        logit_scale=0.5, tie_word_embeddings=True, use_qk_norm=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # mixtures of experts: more experts than top-k (>= 2), odd expert sizes, dense and sparse layers
    TinySpec("mixtral", "mixtral", dict(
        vocab_size=251, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_local_experts=5,
        num_experts_per_tok=2, tie_word_embeddings=False, rms_norm_eps=1e-5, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # a gated shared expert twice the routed ones' size; layer 1 dense; qkv bias
    TinySpec("qwen2_moe", "qwen2_moe", dict(
        vocab_size=263, hidden_size=56, intermediate_size=88, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_experts=6,
        num_experts_per_tok=2, moe_intermediate_size=26, shared_expert_intermediate_size=52,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # q/k head norms, top-3 of 7 renormalized, layer 0 dense
    TinySpec("qwen3_moe", "qwen3_moe", dict(
        vocab_size=257, hidden_size=64, intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=20, max_position_embeddings=128, num_experts=7,
        num_experts_per_tok=3, moe_intermediate_size=30, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[0], tie_word_embeddings=False, rms_norm_eps=1e-6, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # DeepSeek-V2-Lite's shape: MLA without a query latent, YaRN rope, 2 shared experts, the first layer dense
    TinySpec("deepseek_v2_lite", "deepseek_v2", dict(
        vocab_size=241, hidden_size=64, intermediate_size=76, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, q_lora_rank=None,
        kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=6,
        num_experts_per_tok=2, n_shared_experts=2, moe_intermediate_size=18, first_k_dense_replace=1,
        topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 32, "mscale": 0.707,
                                            "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})),
    # DeepSeek-V2's shape: a query latent, group-limited top-3 (2 of 3 groups), scaled routing weights,
    # YaRN with an attention factor != 1
    TinySpec("deepseek_v2", "deepseek_v2", dict(
        vocab_size=239, hidden_size=54, intermediate_size=68, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=128, q_lora_rank=20,
        kv_lora_rank=22, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14, n_routed_experts=6,
        num_experts_per_tok=3, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=0,
        topk_method="group_limited_greedy", n_group=3, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=False, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                         "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8})),
]


def make_hf_model(spec: TinySpec, seed: int = 0):
    import torch
    import transformers

    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "stablelm": (transformers.StableLmConfig, transformers.StableLmForCausalLM),
        "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
    }[spec.arch]
    config = cls_config(**spec.kwargs, attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    # HF's init (std 0.02) gives near-uniform logits; larger weights make the test sharp.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name -> directory written by `save_pretrained` (float32 safetensors)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for spec in TINY_SPECS:
        path = root / spec.name
        make_hf_model(spec).save_pretrained(path, safe_serialization=True)
        out[spec.name] = path
    return out


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from fusec.models.loader import default_model_path

    return default_model_path()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def kv_blocks_all_free(monkeypatch):
    """After every test, every engine it made has freed every KV block."""
    from fusec.runtime.engine import LLMEngine

    engines = []
    original = LLMEngine.__init__

    def tracking_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(LLMEngine, "__init__", tracking_init)
    yield
    for engine in engines:
        assert not engine.has_unfinished_requests(), "a request was left unfinished"
        assert engine.blocks.all_free(), f"{engine.blocks.num_blocks - engine.blocks.num_free} KV blocks leaked"
