"""GPT-NeoX (Pythia) as a graph: LayerNorms with biases, a non-gated GELU MLP with
biases, partial rotary, and the parallel residual: each layer adds its attention and
its MLP, both read from the layer's input, to that input at once (`x + attn(ln1(x)) +
mlp(ln2(x))`), unless `use_parallel_residual` is off (then sequential, as Llama).

The checkpoint interleaves q, k and v per head in `query_key_value`; the loader
regroups the rows as q|k|v (weights.gpt_neox_qkv), so the attention block is Llama's.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Graph
from fusec.models.config import ModelConfig
from fusec.models.llama import HIDDEN_ROWS, T, attention_block, new_graph


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (cfg.vocab_size, h), "norm": (h,), "norm_bias": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for norm in ("input_norm", "post_norm"):
            shapes[p + norm] = shapes[p + norm + "_bias"] = (h,)
        shapes[p + "qkv"], shapes[p + "qkv_bias"] = (cfg.q_size + 2 * cfg.kv_size, h), (cfg.q_size + 2 * cfg.kv_size,)
        shapes[p + "o"], shapes[p + "o_bias"] = (h, cfg.q_size), (h,)
        shapes[p + "up"], shapes[p + "up_bias"] = (inter, h), (inter,)
        shapes[p + "down"], shapes[p + "down_bias"] = (h, inter), (h,)
    return shapes


def build_graph(cfg: ModelConfig, dtype: DType, inv_freq: np.ndarray, block_size: int = 16,
                formats: Mapping[str, str] | None = None, weight_dtype: DType | None = None,
                rope_scale: float = 1.0, kv_dtype: DType | None = None) -> Graph:
    """As llama.build_graph: activations and the KV cache (unless kv_dtype) in `dtype`, weights in
    `weight_dtype` or the block format `formats` names."""
    g, inputs, w = new_graph(cfg, weight_shapes(cfg), dtype, formats, weight_dtype)
    h = cfg.hidden_size

    def norm(x: str, weight: str, name: str | None = None, **attrs) -> str:
        return g.op("layer_norm", [x, w[weight], w[weight + "_bias"]], (T, h), dtype, name=name or weight + ".out",
                    eps=cfg.rms_norm_eps, **attrs)

    def linear(x: str, weight: str, cols: int, layer: int) -> str:
        y = g.op("matmul", [x, w[weight]], (T, cols), dtype, name=weight + ".out", layer=layer)
        return g.op("bias_add", [y, w[weight + "_bias"]], (T, cols), dtype, name=weight + "_bias.out", layer=layer)

    x = g.op("embed", [inputs["token_ids"], w["embed_tokens"]], (T, h), dtype, name="embed")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        attn = attention_block(g, cfg, dtype, w, inputs, norm(x, p + "input_norm", layer=i), i, block_size,
                               inv_freq, rope_scale, kv_dtype)
        o = linear(attn, p + "o", h, i)
        mlp_in = x if cfg.parallel_residual else g.op("add", [o, x], (T, h), dtype, name=p + "attn_residual", layer=i)
        up = linear(norm(mlp_in, p + "post_norm", layer=i), p + "up", cfg.intermediate_size, i)
        act = g.op("gelu", [up], (T, cfg.intermediate_size), dtype, name=p + "gelu", layer=i)
        down = linear(act, p + "down", h, i)
        if cfg.parallel_residual:  # transformers adds mlp + attn, then the input
            x = g.op("add", [g.op("add", [down, o], (T, h), dtype, name=p + "branches", layer=i), x], (T, h), dtype,
                     name=p + "residual", layer=i)
        else:
            x = g.op("add", [down, mlp_in], (T, h), dtype, name=p + "mlp_residual", layer=i)

    x = norm(x, "norm", name="final_norm")
    x = g.op("gather_rows", [x, inputs["logits_indices"]], ("L", h), dtype, name=HIDDEN_ROWS)
    head = w["embed_tokens"] if cfg.tie_word_embeddings else w["lm_head"]
    g.set_outputs(g.op("matmul", [x, head], ("L", cfg.vocab_size), DType.F32, name="logits"))
    return g
