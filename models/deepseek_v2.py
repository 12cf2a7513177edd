"""DeepSeek-V2 / V2-Lite as a graph: multi-head latent attention (MLA) and sparse MLPs.

MLA runs in its absorbed form, so the paged cache holds per token only the normed
kv_lora_rank latent and the rope key shared by the heads ([latent | k_pe], one
"head"), never full keys and values:
    q_nope, q_pe = x @ Wq (or through the q_lora latent and its norm)
    latent, k_pe = rms_norm(x @ Wkv_a[:rank]), rope(x @ Wkv_a[rank:])   -> cache
    q_latent_h   = q_nope_h @ W_uk_h          (kv_b_proj's key half of head h, absorbed)
    o_latent_h   = softmax((q_latent_h . latent + rope(q_pe_h) . k_pe) * scale) @ latent
    out          = concat_h(o_latent_h @ W_uv_h^T) @ Wo
which is transformers' attention with keys [latent @ W_uk_h^T | k_pe] and values
latent @ W_uv_h^T expanded per head. RoPE pairs are interleaved (GPT-J's layout).
The first first_k_dense_replace layers have dense MLPs, the rest sparse ones
(models/moe.py: routed experts and the shared experts, DeepSeek's grouped top-k).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fusec.errors import InputError
from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Graph
from fusec.models import moe
from fusec.models.config import MlaConfig, ModelConfig
from fusec.models.llama import HIDDEN_ROWS, T, dense_mlp, new_graph


def _mla(cfg: ModelConfig) -> MlaConfig:
    assert cfg.mla is not None
    return cfg.mla


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    mla, h, heads = _mla(cfg), cfg.hidden_size, cfg.num_heads
    rank, rot = mla.kv_lora_rank, mla.qk_rope_head_dim
    q_cols = heads * (mla.qk_nope_head_dim + rot)
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (cfg.vocab_size, h), "norm": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_norm"] = shapes[p + "post_norm"] = (h,)
        if mla.q_lora_rank is None:  # q (no-rope parts, rope parts) | the kv latent | k_pe
            shapes[p + "qkv"] = (q_cols + rank + rot, h)
        else:
            shapes[p + "q_a_kv_a"] = (mla.q_lora_rank + rank + rot, h)
            shapes[p + "q_a_norm"] = (mla.q_lora_rank,)
            shapes[p + "q_b"] = (q_cols, mla.q_lora_rank)
        shapes[p + "kv_a_norm"] = (rank,)
        shapes[p + "w_uk"] = (heads * rank, mla.qk_nope_head_dim)
        shapes[p + "w_uv"] = (heads * mla.v_head_dim, rank)
        shapes[p + "o"] = (h, heads * mla.v_head_dim)
        if moe.is_sparse(cfg, i):
            shapes |= moe.weight_shapes(cfg, p)
        else:
            shapes[p + "gate_up"] = (2 * cfg.intermediate_size, h)
            shapes[p + "down"] = (h, cfg.intermediate_size)
    return shapes


def kv_cache_shape(cfg: ModelConfig, block_size: int) -> tuple[int | str, ...]:
    """One half (no separate values) and one head of [latent | k_pe] per token."""
    mla = _mla(cfg)
    return (1, "NB", block_size, 1, mla.kv_lora_rank + mla.qk_rope_head_dim)


def latent_attention(g: Graph, cfg: ModelConfig, dtype: DType, w: Mapping[str, str], inputs: Mapping[str, str],
                     x: str, i: int, block_size: int, inv_freq: np.ndarray, rope_scale: float) -> str:
    """Layer i's MLA of the normed input x, up to the O projection's input [T, heads * v_head_dim]."""
    mla, heads, p = _mla(cfg), cfg.num_heads, f"layers.{i}."
    nope, rot, rank = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    q_cols = heads * (nope + rot)

    def cols(src: str, name: str, start: int, width: int) -> str:
        return g.op("slice", [src], (T, width), dtype, name=p + name, start=start, stop=start + width, layer=i)

    if mla.q_lora_rank is None:
        a = g.op("matmul", [x, w[p + "qkv"]], (T, q_cols + rank + rot), dtype, name=p + "qkv.out", layer=i)
        q, kv_at = a, q_cols
    else:
        ql = mla.q_lora_rank
        a = g.op("matmul", [x, w[p + "q_a_kv_a"]], (T, ql + rank + rot), dtype, name=p + "q_a_kv_a.out", layer=i)
        q_a = g.op("rms_norm", [cols(a, "q_a", 0, ql), w[p + "q_a_norm"]], (T, ql), dtype, name=p + "q_a_norm.out",
                   eps=cfg.rms_norm_eps, layer=i)
        q = g.op("matmul", [q_a, w[p + "q_b"]], (T, q_cols), dtype, name=p + "q_b.out", layer=i)
        kv_at = ql
    q_nope, q_pe = cols(q, "q_nope", 0, heads * nope), cols(q, "q_pe", heads * nope, heads * rot)
    latent = g.op("rms_norm", [cols(a, "latent", kv_at, rank), w[p + "kv_a_norm"]], (T, rank), dtype,
                  name=p + "kv_a_norm.out", eps=cfg.rms_norm_eps, layer=i)
    freqs = tuple(float(f) for f in inv_freq)
    positions = inputs["positions"]
    k_pe = g.op("rope", [cols(a, "k_pe", kv_at + rank, rot), positions], (T, rot), dtype, name=p + "k_rope",
                n_heads=1, head_dim=rot, inv_freq=freqs, scale=rope_scale, interleaved=True, layer=i)
    q_pe = g.op("rope", [q_pe, positions], (T, heads * rot), dtype, name=p + "q_rope", n_heads=heads,
                head_dim=rot, inv_freq=freqs, scale=rope_scale, interleaved=True, layer=i)
    cache = g.state(p + "kv_cache", kv_cache_shape(cfg, block_size), dtype)
    cache = g.op("latent_write", [latent, k_pe, cache, inputs["slot_mapping"]], kv_cache_shape(cfg, block_size),
                 dtype, name=p + "latent_write", layer=i)
    q_latent = g.op("head_matmul", [q_nope, w[p + "w_uk"]], (T, heads * rank), dtype, name=p + "q_absorb",
                    heads=heads, layer=i)
    meta = [inputs[n] for n in ("block_tables", "context_lens", "query_start_loc")]
    o_latent = g.op("mla_attention", [q_latent, q_pe, cache, *meta], (T, heads * rank), dtype,
                    name=p + "attention", n_heads=heads, scale=mla.softmax_scale, layer=i)
    return g.op("head_matmul", [o_latent, w[p + "w_uv"]], (T, heads * mla.v_head_dim), dtype, name=p + "v_up",
                heads=heads, layer=i)


def build_graph(cfg: ModelConfig, dtype: DType, inv_freq: np.ndarray, block_size: int = 16,
                formats: Mapping[str, str] | None = None, weight_dtype: DType | None = None,
                rope_scale: float = 1.0, kv_dtype: DType | None = None) -> Graph:
    """As llama.build_graph: activations and the latent cache in `dtype`, weights in
    `weight_dtype` or the block format `formats` names."""
    if kv_dtype not in (None, dtype):
        raise InputError(f"--kv-cache-dtype {kv_dtype.value}: {cfg.architecture}'s latent cache (MLA) runs in the "
                         f"activation dtype ({dtype.value}) only; use auto")
    g, inputs, w = new_graph(cfg, weight_shapes(cfg), dtype, formats, weight_dtype)
    h = cfg.hidden_size

    def norm(x: str, weight: str, name: str | None = None, **attrs) -> str:
        return g.op("rms_norm", [x, w[weight]], (T, h), dtype, name=name or weight + ".out", eps=cfg.rms_norm_eps,
                    **attrs)

    x = g.op("embed", [inputs["token_ids"], w["embed_tokens"]], (T, h), dtype, name="embed")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        attn = latent_attention(g, cfg, dtype, w, inputs, norm(x, p + "input_norm", layer=i), i, block_size,
                                inv_freq, rope_scale)
        o = g.op("matmul", [attn, w[p + "o"]], (T, h), dtype, name=p + "o.out", layer=i)
        x = g.op("add", [x, o], (T, h), dtype, name=p + "attn_residual", layer=i)
        xn = norm(x, p + "post_norm", layer=i)
        mlp = moe.sparse_mlp(g, cfg, dtype, w, xn, i) if moe.is_sparse(cfg, i) else dense_mlp(g, cfg, dtype, w, xn, i)
        x = g.op("add", [x, mlp], (T, h), dtype, name=p + "mlp_residual", layer=i)

    x = norm(x, "norm", name="final_norm")
    x = g.op("gather_rows", [x, inputs["logits_indices"]], ("L", h), dtype, name=HIDDEN_ROWS)
    head = w["embed_tokens"] if cfg.tie_word_embeddings else w["lm_head"]
    g.set_outputs(g.op("matmul", [x, head], ("L", cfg.vocab_size), DType.F32, name="logits"))
    return g
