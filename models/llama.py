"""The Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2, StableLM, Cohere,
and the mixture-of-experts Mixtral, Qwen2-MoE and Qwen3-MoE) as one graph builder.

They differ only in configuration: qkv bias (Qwen2), sliding window (Mistral, Phi-3),
rope scaling (Llama 3, Phi-3's LongRoPE), partial rotary (Phi-3.5 / Phi-4-mini), an
RMSNorm of each q and k head before RoPE (Qwen3), GeGLU and embeddings scaled by
sqrt(hidden) (Gemma, whose (1 + w) norm weights are stored with the 1 added), and Gemma
2's norms on each block's output, soft-capped attention scores and logits, and sliding
window on alternate layers; LayerNorms (StableLM, Cohere's without bias), a parallel
residual from one norm (Cohere, StableLM's variant), GPT-J rotary pairs and a logit
scale (Cohere); sparse MLPs (models/moe.py) on the layers the config names. Projections
that read the same input are stored concatenated (q|k|v and gate|up), as the fused
kernels want them.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fusec.fusion.dtypes import DType, from_storage, to_storage
from fusec.fusion.ir import Graph
from fusec.models import moe
from fusec.models.config import ModelConfig

T = "T"
INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "context_lens",
          "query_start_loc", "logits_indices")
# The final-normed hidden states of the rows that get logits: not a graph output (the
# decode plan's LM-head GEMV keeps them in registers), but a value a runner may ask the
# plans for (an embedding is its prompt's last row, vLLM's LAST pooling)
HIDDEN_ROWS = "logit_rows"


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the graph reads, by name, with its shape."""
    h, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (cfg.vocab_size, h), "norm": (h,)}
    layer_norm = cfg.norm == "layer_norm"  # a bias beside each norm weight (zeros where the family has none)
    if layer_norm:
        shapes["norm_bias"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_norm"] = (h,)
        if layer_norm:
            shapes[p + "input_norm_bias"] = (h,)
        shapes[p + "qkv"] = (qkv, h)
        if cfg.qkv_bias:
            shapes[p + "qkv_bias"] = (qkv,)
        if cfg.qk_norm:
            shapes[p + "q_norm"] = shapes[p + "k_norm"] = (cfg.head_dim,)
        if cfg.qk_layer_norm:  # a weight row per head
            shapes[p + "q_norm"], shapes[p + "k_norm"] = (cfg.num_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)
        shapes[p + "o"] = (h, cfg.q_size)
        if cfg.o_bias:
            shapes[p + "o_bias"] = (h,)
        if not cfg.parallel_residual:  # the norm before the MLP (Cohere's MLP reads the input norm's)
            shapes[p + "post_norm"] = (h,)
            if layer_norm:
                shapes[p + "post_norm_bias"] = (h,)
        if cfg.sandwich_norms:
            shapes[p + "attn_out_norm"] = shapes[p + "mlp_out_norm"] = (h,)
        if moe.is_sparse(cfg, i):
            shapes |= moe.weight_shapes(cfg, p)
        else:
            shapes[p + "gate_up"] = (2 * cfg.intermediate_size, h)
            shapes[p + "down"] = (h, cfg.intermediate_size)
    return shapes


def kv_cache_shape(cfg: ModelConfig, block_size: int) -> tuple[int | str, ...]:
    return (2, "NB", block_size, cfg.num_kv_heads, cfg.head_dim)


def graph_inputs(g: Graph) -> dict[str, str]:
    """The step's inputs (INPUTS), added to g: token ids, positions and the paged-cache metadata."""
    shapes = {"token_ids": (T,), "positions": (T,), "slot_mapping": (T,), "block_tables": ("S", "B"),
              "context_lens": ("S",), "query_start_loc": ("S1",), "logits_indices": ("L",)}
    return {name: g.input(name, shapes[name]) for name in INPUTS}


def new_graph(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], dtype: DType, formats: Mapping[str, str] | None,
              weight_dtype: DType | None) -> tuple[Graph, dict[str, str], dict[str, str]]:
    """A model's graph with its step inputs and weights (in `weight_dtype`, default the
    activation dtype, or the block format `formats` names): (graph, inputs, weights)."""
    g = Graph(f"{cfg.architecture}-{cfg.num_layers}L")
    inputs = graph_inputs(g)
    formats = formats or {}
    weights = {name: g.weight(name, shape, weight_dtype or dtype, formats.get(name)) for name, shape in shapes.items()}
    return g, inputs, weights


def attention_block(g: Graph, cfg: ModelConfig, dtype: DType, w: Mapping[str, str], inputs: Mapping[str, str],
                    x: str, i: int, block_size: int, inv_freq: np.ndarray, rope_scale: float,
                    kv_dtype: DType | None = None) -> str:
    """Layer i's attention of the normed input x up to the O projection: the q|k|v GEMV
    [+ bias], [per-head q/k norms,] RoPE, the paged-cache write (K and V rounded to
    kv_dtype, default dtype) and paged attention."""
    p, hd = f"layers.{i}.", cfg.head_dim
    rope_freqs = tuple(float(f) for f in inv_freq)
    qkv_cols = cfg.q_size + 2 * cfg.kv_size
    qkv = g.op("matmul", [x, w[p + "qkv"]], (T, qkv_cols), dtype, name=p + "qkv.out", layer=i)
    if cfg.qkv_bias:
        qkv = g.op("bias_add", [qkv, w[p + "qkv_bias"]], (T, qkv_cols), dtype, name=p + "qkv_bias.out", layer=i)
    q = g.op("slice", [qkv], (T, cfg.q_size), dtype, name=p + "q", start=0, stop=cfg.q_size, layer=i)
    k = g.op("slice", [qkv], (T, cfg.kv_size), dtype, name=p + "k",
             start=cfg.q_size, stop=cfg.q_size + cfg.kv_size, layer=i)
    v = g.op("slice", [qkv], (T, cfg.kv_size), dtype, name=p + "v",
             start=cfg.q_size + cfg.kv_size, stop=qkv_cols, layer=i)
    if cfg.qk_norm or cfg.qk_layer_norm:
        kind = "head_layer_norm" if cfg.qk_layer_norm else "head_rms_norm"
        q = g.op(kind, [q, w[p + "q_norm"]], (T, cfg.q_size), dtype, name=p + "q_norm.out",
                 eps=cfg.rms_norm_eps, head_dim=hd, layer=i)
        k = g.op(kind, [k, w[p + "k_norm"]], (T, cfg.kv_size), dtype, name=p + "k_norm.out",
                 eps=cfg.rms_norm_eps, head_dim=hd, layer=i)
    positions = inputs["positions"]
    q = g.op("rope", [q, positions], (T, cfg.q_size), dtype, name=p + "q_rope", n_heads=cfg.num_heads, head_dim=hd,
             inv_freq=rope_freqs, scale=rope_scale, interleaved=cfg.interleaved_rope, layer=i)
    k = g.op("rope", [k, positions], (T, cfg.kv_size), dtype, name=p + "k_rope", n_heads=cfg.num_kv_heads,
             head_dim=hd, inv_freq=rope_freqs, scale=rope_scale, interleaved=cfg.interleaved_rope, layer=i)
    cache = g.state(p + "kv_cache", kv_cache_shape(cfg, block_size), kv_dtype or dtype)
    cache = g.op("kv_write", [k, v, cache, inputs["slot_mapping"]], kv_cache_shape(cfg, block_size),
                 kv_dtype or dtype, name=p + "kv_write", layer=i)
    meta = [inputs[n] for n in ("block_tables", "context_lens", "query_start_loc")]
    return g.op("attention", [q, cache, *meta], (T, cfg.q_size), dtype,
                name=p + "attention", n_heads=cfg.num_heads, n_kv_heads=cfg.num_kv_heads,
                head_dim=hd, scale=(cfg.query_pre_attn_scalar or hd) ** -0.5, softcap=cfg.attn_softcap,
                sliding_window=cfg.sliding_window if cfg.sliding_layers is None or i in cfg.sliding_layers
                else None, layer=i)


def dense_mlp(g: Graph, cfg: ModelConfig, dtype: DType, w: Mapping[str, str], x: str, i: int) -> str:
    """Layer i's gated MLP of the normed input x: gate|up GEMV, activation, down GEMV."""
    p, inter = f"layers.{i}.", cfg.intermediate_size
    gu = g.op("matmul", [x, w[p + "gate_up"]], (T, 2 * inter), dtype, name=p + "gate_up.out", layer=i)
    act = g.op(cfg.mlp_gate, [gu], (T, inter), dtype, name=p + cfg.mlp_gate, layer=i)
    return g.op("matmul", [act, w[p + "down"]], (T, cfg.hidden_size), dtype, name=p + "down.out", layer=i)


def build_graph(cfg: ModelConfig, dtype: DType, inv_freq: np.ndarray, block_size: int = 16,
                formats: Mapping[str, str] | None = None, weight_dtype: DType | None = None,
                rope_scale: float = 1.0, kv_dtype: DType | None = None) -> Graph:
    """The model as a graph with activations (and the KV cache, unless kv_dtype) in `dtype`; weights in
    `weight_dtype` (default: dtype), or in a block format where `formats` names one.
    RoPE turns 2 * len(inv_freq) dims of each head, with cos and sin times `rope_scale`."""
    g, inputs, w = new_graph(cfg, weight_shapes(cfg), dtype, formats, weight_dtype)
    h = cfg.hidden_size

    def norm(x: str, weight: str, name: str | None = None, **attrs) -> str:
        """The family's norm (RMSNorm, or LayerNorm with its bias) of x by `weight`."""
        operands = [x, w[weight]] + ([w[weight + "_bias"]] if cfg.norm == "layer_norm" else [])
        return g.op(cfg.norm, operands, (T, h), dtype, name=name or weight + ".out", eps=cfg.rms_norm_eps, **attrs)

    # Gemma scales by sqrt(hidden) rounded to the table's dtype, as transformers does
    scale = float(from_storage(to_storage(np.float32([h ** 0.5]), weight_dtype or dtype), weight_dtype or dtype)[0]) \
        if cfg.scale_embeddings else 1.0
    x = g.op("embed", [inputs["token_ids"], w["embed_tokens"]], (T, h), dtype, name="embed", scale=scale)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        residual = x
        attn = attention_block(g, cfg, dtype, w, inputs, norm(x, p + "input_norm", layer=i), i, block_size,
                               inv_freq, rope_scale, kv_dtype)
        o = g.op("matmul", [attn, w[p + "o"]], (T, h), dtype, name=p + "o.out", layer=i)
        if cfg.o_bias:
            o = g.op("bias_add", [o, w[p + "o_bias"]], (T, h), dtype, name=p + "o_bias.out", layer=i)
        if cfg.sandwich_norms:
            o = g.op("rms_norm", [o, w[p + "attn_out_norm"]], (T, h), dtype, name=p + "attn_out_norm.out",
                     eps=cfg.rms_norm_eps, layer=i)
        x = g.op("add", [residual, o], (T, h), dtype, name=p + "attn_residual", layer=i)
        if cfg.parallel_residual:
            # the MLP reads the layer's input normed by the same weights: a second norm op rather than a
            # shared value, so each GEMV keeps it in its prologue (one launch each)
            x, residual = norm(residual, p + "input_norm", name=p + "mlp_norm.out", layer=i), x
        else:
            residual = x
            x = norm(x, p + "post_norm", layer=i)
        down = moe.sparse_mlp(g, cfg, dtype, w, x, i) if moe.is_sparse(cfg, i) else dense_mlp(g, cfg, dtype, w, x, i)
        if cfg.sandwich_norms:
            down = g.op("rms_norm", [down, w[p + "mlp_out_norm"]], (T, h), dtype, name=p + "mlp_out_norm.out",
                        eps=cfg.rms_norm_eps, layer=i)
        x = g.op("add", [residual, down], (T, h), dtype, name=p + "mlp_residual", layer=i)

    x = norm(x, "norm", name="final_norm")
    x = g.op("gather_rows", [x, inputs["logits_indices"]], ("L", h), dtype, name=HIDDEN_ROWS)
    head = w["embed_tokens"] if cfg.tie_word_embeddings else w["lm_head"]
    logits = g.op("matmul", [x, head], ("L", cfg.vocab_size), DType.F32, name="logits")
    if cfg.logit_scale is not None:
        logits = g.op("scale", [logits], ("L", cfg.vocab_size), DType.F32, name="scaled_logits",
                      factor=cfg.logit_scale)
    if cfg.final_softcap:
        logits = g.op("softcap", [logits], ("L", cfg.vocab_size), DType.F32, name="capped_logits",
                      cap=cfg.final_softcap)
    g.set_outputs(logits)
    return g
