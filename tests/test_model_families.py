"""Each model family beyond Llama: a tiny random checkpoint written by transformers (odd
sizes, GQA, the family's options on; mixtures of experts with more experts than top-k,
top-k >= 2) gives transformers' greedy tokens, 20 of them on several prompts, from the
reference interpreter and from the fused plans; where
llama.cpp writes the family, a GGUF written with the `gguf` package gives the tokens
the safetensors checkpoint gives."""
from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from conftest import TINY_SPECS, make_hf_model
from fusec.models.loader import load_model
from fusec.runtime.engine import EngineConfig, LLMEngine
from fusec.runtime.sequence import SamplingParams
from helpers import run_requests

FAMILIES = ["qwen3", "phi3", "gemma", "gemma2", "stablelm", "stablelm_par", "gpt_neox", "cohere"]
# mixtures of experts (tests/test_moe_models.py has their other checks)
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2_lite", "deepseek_v2"]
NEW_TOKENS = 20
# transformers picks LongRoPE's factors by each forward's length; fusec by the served
# context (as vLLM and llama.cpp): up to the original 64 positions both use the short ones
ENGINE_ARGS = {"phi3": {"max_model_len": 64}}


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, vocab, n).tolist() for n in (3, 9, 17)]


def hf_greedy(hf, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def fusec_greedy(path: str, executor: str, prompt_list: list[list[int]], **engine_args) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(executor=executor, **engine_args), model=load_model(path))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in run_requests(engine, prompt_list, params)]


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(tiny_checkpoints[name], dtype=torch.float32,
                                                       attn_implementation="eager",
                                                       experts_implementation="eager").eval()
            for name in FAMILIES + MOE_FAMILIES}


@pytest.mark.parametrize("executor", ["reference", "fused"])
@pytest.mark.parametrize("name", FAMILIES + MOE_FAMILIES)
def test_greedy_tokens_equal_transformers(tiny_checkpoints, hf_models, name, executor):
    hf = hf_models[name]
    ps = prompts(hf.config.vocab_size)
    want = [hf_greedy(hf, p) for p in ps]
    assert fusec_greedy(str(tiny_checkpoints[name]), executor, ps, **ENGINE_ARGS.get(name, {})) == want


def test_longrope_long_factors_past_the_original_context(tiny_checkpoints, hf_models):
    """Served past its original 64 positions, Phi-3 turns every position with the long
    factors: an 80-token prompt's logits equal transformers' one forward over it (which
    picks the long factors for a forward longer than 64)."""
    from helpers import SequenceChunk, poisoned_runner, rel_err

    hf = hf_models["phi3"]
    ids = np.random.default_rng(5).integers(0, hf.config.vocab_size, 80).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    model = load_model(str(tiny_checkpoints["phi3"]))
    got = poisoned_runner(model, 24, 8).execute([SequenceChunk(ids, 0, list(range(10)), all_logits=True)])
    assert rel_err(got, want) < 1e-4


# -- GGUF, as llama.cpp's converter writes each family ----------------------------------------------
GGUF_LAYER_NAMES = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                    ("self_attn.o_proj", "attn_output"), ("self_attn.q_norm", "attn_q_norm"),
                    ("self_attn.k_norm", "attn_k_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                    ("mlp.down_proj", "ffn_down")]


# transformers' in-memory MoE parameters (experts fused as stacks) -> llama.cpp's tensors
MOE_GGUF = ("mixtral", "qwen2_moe", "qwen3_moe")
MOE_GGUF_NAMES = [("gate.weight", "ffn_gate_inp.weight"), ("experts.down_proj", "ffn_down_exps.weight"),
                  ("shared_expert.gate_proj.weight", "ffn_gate_shexp.weight"),
                  ("shared_expert.up_proj.weight", "ffn_up_shexp.weight"),
                  ("shared_expert.down_proj.weight", "ffn_down_shexp.weight"),
                  ("shared_expert_gate.weight", "ffn_gate_inp_shexp.weight")]


NEOX_LAYER_NAMES = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                    ("attention.query_key_value", "attn_qkv"), ("attention.dense", "attn_output"),
                    ("mlp.dense_h_to_4h", "ffn_up"), ("mlp.dense_4h_to_h", "ffn_down")]


def write_gguf(hf, arch: str, path) -> None:
    """An HF checkpoint as llama.cpp's convert_hf_to_gguf writes this architecture (f32)."""
    import math

    c = hf.config
    gguf_arch = {"gpt_neox": "gptneox", "cohere": "command-r", "mixtral": "llama", "qwen2_moe": "qwen2moe",
                 "qwen3_moe": "qwen3moe"}.get(arch, arch)
    w = gguf.GGUFWriter(str(path), gguf_arch)
    rope = c.rope_parameters
    if arch in MOE_GGUF:
        w.add_expert_count(getattr(c, "num_local_experts", None) or c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    if arch in ("qwen2_moe", "qwen3_moe"):
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if arch == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if arch == "gemma2":  # llama.cpp stores the caps and the window; every other layer slides
        w.add_float32("gemma2.attn_logit_softcapping", c.attn_logit_softcapping)
        w.add_float32("gemma2.final_logit_softcapping", c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    if arch == "phi3":  # fused q|k|v and gate|up, LongRoPE factors as tensors, partial rotary
        head_dim = c.hidden_size // c.num_attention_heads
        w.add_rope_dimension_count(int(head_dim * rope["partial_rotary_factor"]))
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        scale = c.max_position_embeddings / c.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(c.original_max_position_embeddings)))
        w.add_sliding_window(c.sliding_window)
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)  # Mixtral's: its experts'
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch in ("stablelm", "gpt_neox", "cohere"):  # LayerNorms: their eps under another key
        w.add_layer_norm_eps(c.layer_norm_eps)
        if arch == "gpt_neox":
            w.add_parallel_residual(c.use_parallel_residual)
        if arch == "cohere":
            w.add_logit_scale(c.logit_scale)
        else:  # RoPE on part of each head
            w.add_rope_dimension_count(int(c.hidden_size // c.num_attention_heads * rope["partial_rotary_factor"]))
    else:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "model.norm.bias": "output_norm.bias", "lm_head.weight": "output.weight",
             "gpt_neox.embed_in.weight": "token_embd.weight", "gpt_neox.final_layer_norm.weight": "output_norm.weight",
             "gpt_neox.final_layer_norm.bias": "output_norm.bias", "embed_out.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        parts = GGUF_LAYER_NAMES + [("self_attn.qkv_proj", "attn_qkv"), ("mlp.gate_up_proj", "ffn_up")]
        if arch == "gemma2":
            parts += [("post_attention_layernorm", "post_attention_norm"), ("pre_feedforward_layernorm", "ffn_norm"),
                      ("post_feedforward_layernorm", "post_ffw_norm")]
        for hf_part, g_part in parts:
            for kind in ("weight", "bias"):  # biases: StableLM's norms and q/k/v
                names[f"model.layers.{i}.{hf_part}.{kind}"] = f"blk.{i}.{g_part}.{kind}"
        for hf_part, g_part in NEOX_LAYER_NAMES:
            for kind in ("weight", "bias"):
                names[f"gpt_neox.layers.{i}.{hf_part}.{kind}"] = f"blk.{i}.{g_part}.{kind}"
        for hf_part, g_part in MOE_GGUF_NAMES:
            names[f"model.layers.{i}.mlp.{hf_part}"] = f"blk.{i}.{g_part}"
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.detach().float().numpy()
        if hf_name.endswith("mlp.experts.gate_up_proj"):  # transformers' [E, gate | up, H]: llama.cpp's two stacks
            half = t.shape[1] // 2
            layer = hf_name.split(".")[2]
            w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(t[:, :half]))
            w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(t[:, half:]))
            continue
        if hf_name.endswith("shared_expert_gate.weight"):  # a vector in llama.cpp's files
            t = t.reshape(-1)
        if arch == "mixtral" and (".q_proj." in hf_name or ".k_proj." in hf_name):  # as for any llama
            heads = c.num_attention_heads if ".q_proj." in hf_name else c.num_key_value_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
        if arch in ("gemma", "gemma2") and hf_name.endswith("norm.weight"):
            t = t + 1  # llama.cpp's converter stores Gemma's (1 + w)
        if ".query_key_value." in hf_name:  # llama.cpp's converter regroups NeoX's per-head q k v as q|k|v
            t = t.reshape(c.num_attention_heads, 3, head_dim, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)
        w.add_tensor(names[hf_name], t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", FAMILIES + list(MOE_GGUF))
def test_gguf_gives_the_safetensors_tokens(tmp_path, name):
    spec = next(s for s in TINY_SPECS if s.name == name)
    if name == "gemma2":  # llama.cpp scales queries by head_dim ** -0.5 (but in the 27B model)
        spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "query_pre_attn_scalar": spec.kwargs["head_dim"]})
    hf = make_hf_model(spec)
    write_gguf(hf, spec.arch, tmp_path / "m.gguf")
    model = load_model(str(tmp_path / "m.gguf"))
    assert model.config.architecture == spec.arch
    hf.save_pretrained(tmp_path / "st", safe_serialization=True)
    ps = prompts(hf.config.vocab_size)
    args = ENGINE_ARGS.get(name, {})
    assert fusec_greedy(str(tmp_path / "m.gguf"), "fused", ps, **args) == \
        fusec_greedy(str(tmp_path / "st"), "fused", ps, **args)
