"""GGUF loading: llama.cpp's q/k permutation undone, each supported tensor type decoded
right (checked against an independent decoder of the block formats), logits vs HF."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import TINY_SPECS, TinySpec, make_hf_model
from helpers import SequenceChunk, poisoned_runner, rel_err
from fusec.models.config import config_from_hf
from fusec.models.loader import load_model
from fusec.models.rope import inv_freq

QUANT_SPEC = TinySpec("llama-q", "llama", dict(
    vocab_size=160, hidden_size=96, intermediate_size=224, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to attn_q / attn_k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_model, path, qtype: gguf.GGMLQuantizationType) -> dict[str, np.ndarray]:
    """Write an HF Llama as llama.cpp would; returns the raw bytes of each quantized tensor."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        for hf_part, g_part in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                                ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                                ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                                ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                                ("mlp.down_proj", "ffn_down")]:
            names[f"model.layers.{i}.{hf_part}.weight"] = f"blk.{i}.{g_part}.weight"
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    cfg = config_from_hf(c.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    if c.rope_parameters["rope_type"] == "llama3":
        base = inv_freq(config_from_hf(c.to_dict() | {"architectures": ["LlamaForCausalLM"],
                                                      "rope_parameters": {"rope_theta": cfg.rope_theta}}))
        w.add_tensor("rope_freqs.weight", (base / inv_freq(cfg)).astype(np.float32))
    raw = {}
    for hf_name, t in sd.items():
        name = names[hf_name]
        if name.endswith("attn_q.weight"):
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = llama_cpp_permute(t, c.num_key_value_heads)
        if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, t.astype(np.float32))
        else:
            q = gguf.quants.quantize(t, qtype)
            raw[name] = q
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


def decode_blocks(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, cols: int) -> np.ndarray:
    """Independent decoder of ggml's Q8_0 / Q4_0 / Q4_1 / F16 / BF16 rows."""
    rows = raw.reshape(raw.shape[0], -1)
    if qtype == gguf.GGMLQuantizationType.F16:
        return rows.view(np.float16).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    nb = cols // 32
    blocks = rows.reshape(rows.shape[0], nb, -1)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return (blocks[..., 2:].view(np.int8).astype(np.float32) * d).reshape(rows.shape[0], cols)
    off, m = 2, np.float32(0)
    if qtype == gguf.GGMLQuantizationType.Q4_1:
        m, off = blocks[..., 2:4].copy().view(np.float16).astype(np.float32), 4
    nib = blocks[..., off:off + 16]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.Q4_0:
        return ((q - 8) * d).reshape(rows.shape[0], cols)
    return (q * d + m).reshape(rows.shape[0], cols)


def test_f32_gguf_matches_transformers(tmp_path):
    spec = next(s for s in TINY_SPECS if s.name == "llama")  # GQA, untied, llama3 rope, head_dim
    hf = make_hf_model(spec)
    write_gguf(hf, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32)
    model = load_model(str(tmp_path / "m.gguf"))
    assert model.config.rope_scaling["rope_type"] == "freq_factors"
    assert not model.config.tie_word_embeddings and model.config.head_dim == 16
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = poisoned_runner(model, 4, 8).execute([SequenceChunk(ids, 0, [2, 0], all_logits=True)])
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_decodes_exactly(tmp_path, qtype):
    qt = gguf.GGMLQuantizationType[qtype]
    hf = make_hf_model(QUANT_SPEC)
    raw = write_gguf(hf, tmp_path / "m.gguf", qt)
    model = load_model(str(tmp_path / "m.gguf"), quantization="none")  # decoded at load (as on a GPU)
    cfg = model.config
    h = cfg.hidden_size
    # every weight kind: embedding, permuted q, plain k-less matrices, down
    q_rows = decode_blocks(raw["blk.1.attn_q.weight"], qt, h)
    q_rows = q_rows.reshape(cfg.num_heads, cfg.head_dim // 2, 2, h).swapaxes(1, 2).reshape(-1, h)
    np.testing.assert_array_equal(model.weights["layers.1.qkv"][: cfg.q_size], q_rows)
    np.testing.assert_array_equal(model.weights["embed_tokens"], decode_blocks(raw["token_embd.weight"], qt, h))
    np.testing.assert_array_equal(model.weights["layers.0.down"],
                                  decode_blocks(raw["blk.0.ffn_down.weight"], qt, cfg.intermediate_size))
    # and the decoded model is the HF model up to quantization noise
    orig = hf.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    bound = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.2}[qtype]
    assert rel_err(model.weights["layers.1.qkv"][: cfg.q_size], orig) < bound
