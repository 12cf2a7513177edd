"""Op kinds of the IR, each with its one numpy reference semantics.

A reference function takes float32 arrays (int32 for ids and metadata) in operand
order and the node's attributes as keywords, and returns a float32 array. The
interpreter rounds results to the node's dtype. These functions ARE the model's
meaning: fused kernels and backends are tested against them.

Paged KV cache layout (one state tensor per layer):
    cache[2, NB, block_size, n_kv_heads, head_dim]   (index 0 = keys, 1 = values)
A token's slot is block * block_size + offset; `slot_mapping` gives each new token's
slot (negative = do not write, e.g. padding). `block_tables[s]` lists sequence s's
blocks in order, `context_lens[s]` counts its tokens including the new ones, and
`query_start_loc[s]:query_start_loc[s+1]` are its rows among the T new tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class OpSpec:
    kind: str
    arity: int
    reference: Callable[..., np.ndarray]
    doc: str
    # Fusion legality: an elementwise op reads only the elements it writes; any other op
    # reads whole rows. A split-output op (a GEMV) writes each row from many blocks.
    elementwise: bool = False
    split_output: bool = False


def _registry(*specs: OpSpec) -> dict[str, OpSpec]:
    return {s.kind: s for s in specs}


def embed(ids: np.ndarray, table: np.ndarray, *, scale: float = 1.0) -> np.ndarray:
    """Rows of the table, times `scale` (Gemma's sqrt(hidden), rounded to the table's
    dtype by the graph builder, as transformers rounds it)."""
    return table[ids] * np.float32(scale)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def rms_norm(x: np.ndarray, w: np.ndarray, *, eps: float) -> np.ndarray:
    inv = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(eps))
    return (x * inv.astype(np.float32)) * w


def head_rms_norm(x: np.ndarray, w: np.ndarray, *, eps: float, head_dim: int) -> np.ndarray:
    """rms_norm of each head's head_dim slice of x[T, heads * head_dim], one w[head_dim]
    for every head (Qwen3's q_norm / k_norm before RoPE)."""
    t = x.shape[0]
    return rms_norm(x.reshape(t, -1, head_dim), w, eps=eps).reshape(x.shape)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, *, eps: float) -> np.ndarray:
    """(x - mean(x)) / sqrt(var(x) + eps) * w + b over the last axis (StableLM)."""
    centred = x - np.mean(x, axis=-1, keepdims=True)
    inv = 1.0 / np.sqrt(np.mean(np.square(centred), axis=-1, keepdims=True) + np.float32(eps))
    return centred * inv.astype(np.float32) * w + b


def head_layer_norm(x: np.ndarray, w: np.ndarray, *, eps: float, head_dim: int) -> np.ndarray:
    """A bias-free LayerNorm of each head's slice of x[T, heads * head_dim], each head with
    its own weights w[heads, head_dim] (Cohere's q_norm / k_norm)."""
    t = x.shape[0]
    heads = x.reshape(t, -1, head_dim)
    centred = heads - np.mean(heads, axis=-1, keepdims=True)
    inv = 1.0 / np.sqrt(np.mean(np.square(centred), axis=-1, keepdims=True) + np.float32(eps))
    return (centred * inv.astype(np.float32) * w).reshape(x.shape)


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x[T, K] @ w[N, K]^T: weights are stored output-major, as in HF checkpoints."""
    return x @ w.T


def bias_add(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x + b


def slice_cols(x: np.ndarray, *, start: int, stop: int) -> np.ndarray:
    return x[:, start:stop]


def rope(x: np.ndarray, positions: np.ndarray, *, n_heads: int, head_dim: int,
         inv_freq: tuple[float, ...], scale: float = 1.0, interleaved: bool = False) -> np.ndarray:
    """Rotary embedding in the rotate-half (NeoX / HF) layout, per head, over the first
    2 * len(inv_freq) dims of each head (partial rotary: the rest pass through); cos
    and sin are multiplied by `scale` (LongRoPE's attention factor). `interleaved`:
    GPT-J's layout (Cohere), pair j is dims (2j, 2j + 1) instead of (j, j + half)."""
    t = x.shape[0]
    freqs = positions.astype(np.float32)[:, None] * np.asarray(inv_freq, dtype=np.float32)[None, :]
    cos = (np.cos(freqs) * np.float32(scale))[:, None, :]
    sin = (np.sin(freqs) * np.float32(scale))[:, None, :]
    xh = x.reshape(t, n_heads, head_dim)
    half = len(inv_freq)
    if interleaved:
        out = xh.copy()
        x1, x2 = xh[..., 0:2 * half:2], xh[..., 1:2 * half:2]
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out.reshape(t, n_heads * head_dim)
    x1, x2, rest = xh[..., :half], xh[..., half:2 * half], xh[..., 2 * half:]
    out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.reshape(t, n_heads * head_dim)


def kv_write(k: np.ndarray, v: np.ndarray, cache: np.ndarray, slot_mapping: np.ndarray) -> np.ndarray:
    """Write each token's k and v rows into its slot of the paged cache (in place)."""
    _, _, block_size, n_kv, head_dim = cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    cache[0, blocks, offsets] = k[valid].reshape(-1, n_kv, head_dim)
    cache[1, blocks, offsets] = v[valid].reshape(-1, n_kv, head_dim)
    return cache


def attention(q: np.ndarray, cache: np.ndarray, block_tables: np.ndarray, context_lens: np.ndarray,
              query_start_loc: np.ndarray, *, n_heads: int, n_kv_heads: int, head_dim: int,
              scale: float, sliding_window: int | None = None, softcap: float | None = None) -> np.ndarray:
    """Causal GQA attention of the new tokens over each sequence's paged context; with
    `softcap`, scores become softcap * tanh(scores / softcap) before the mask (Gemma 2)."""
    t = q.shape[0]
    block_size = cache.shape[2]
    group = n_heads // n_kv_heads
    qh = q.reshape(t, n_heads, head_dim)
    out = np.zeros((t, n_heads, head_dim), dtype=np.float32)
    for s in range(len(context_lens)):
        a, b = int(query_start_loc[s]), int(query_start_loc[s + 1])
        n_new, ctx = b - a, int(context_lens[s])
        if n_new == 0:
            continue
        blocks = block_tables[s, : -(-ctx // block_size)]
        keys = cache[0, blocks].reshape(-1, n_kv_heads, head_dim)[:ctx]
        values = cache[1, blocks].reshape(-1, n_kv_heads, head_dim)[:ctx]
        keys = np.repeat(keys, group, axis=1)
        values = np.repeat(values, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", qh[a:b], keys) * np.float32(scale)
        if softcap:
            scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
        q_pos = np.arange(ctx - n_new, ctx)[:, None]
        k_pos = np.arange(ctx)[None, :]
        mask = k_pos <= q_pos
        if sliding_window:
            mask &= k_pos > q_pos - sliding_window
        scores = np.where(mask[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[a:b] = np.einsum("hqk,khd->qhd", p, values)
    return out.reshape(t, n_heads * head_dim)


def silu_mul(x: np.ndarray) -> np.ndarray:
    """x = [gate | up] along the last axis -> silu(gate) * up."""
    half = x.shape[-1] // 2
    gate, up = x[:, :half], x[:, half:]
    return gate / (1.0 + np.exp(-gate)) * up


def scale(x: np.ndarray, *, factor: float) -> np.ndarray:
    """x * factor: Cohere's logit_scale."""
    return x * np.float32(factor)


def softcap(x: np.ndarray, *, cap: float) -> np.ndarray:
    """cap * tanh(x / cap): Gemma 2's final logits."""
    return np.float32(cap) * np.tanh(x / np.float32(cap))


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """x * Phi(x), the exact (erf) GELU: GPT-NeoX's non-gated MLP."""
    return (0.5 * x.astype(np.float64) * (1.0 + _erf(x.astype(np.float64) / math.sqrt(2.0)).astype(np.float64))
            ).astype(np.float32)


def gelu_tanh_mul(x: np.ndarray) -> np.ndarray:
    """x = [gate | up] along the last axis -> gelu_tanh(gate) * up (GeGLU, Gemma's MLP)."""
    half = x.shape[-1] // 2
    gate, up = x[:, :half], x[:, half:]
    inner = np.float32(0.7978845608028654) * (gate + np.float32(0.044715) * gate ** 3)
    return np.float32(0.5) * gate * (np.float32(1.0) + np.tanh(inner)) * up


def gather_rows(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return x[indices]


OPS: dict[str, OpSpec] = _registry(
    OpSpec("embed", 2, embed, "rows of an embedding table: (ids[T], table[V, H]) -> [T, H]; attr scale"),
    OpSpec("add", 2, add, "elementwise sum", elementwise=True),
    OpSpec("rms_norm", 2, rms_norm, "x / rms(x) * w over the last axis; attr eps"),
    OpSpec("head_layer_norm", 2, head_layer_norm,
           "bias-free LayerNorm per head, per-head weights: x[T, heads*hd], w[heads, hd]; attrs eps, head_dim"),
    OpSpec("layer_norm", 3, layer_norm, "(x - mean) / std * w + b over the last axis; attr eps"),
    OpSpec("head_rms_norm", 2, head_rms_norm, "rms_norm per head: x[T, heads*hd], w[hd]; attrs eps, head_dim"),
    OpSpec("matmul", 2, matmul, "x[T, K] @ w[N, K]^T", split_output=True),
    OpSpec("bias_add", 2, bias_add, "x + b, b broadcast over rows", elementwise=True),
    OpSpec("slice", 1, slice_cols, "columns [start, stop)"),
    OpSpec("rope", 2, rope, "rotary embedding (rotate-half) of x[T, heads*hd] at positions[T]"),
    OpSpec("kv_write", 4, kv_write, "(k, v, cache, slot_mapping) -> cache with rows written"),
    OpSpec("attention", 5, attention,
           "(q, cache, block_tables, context_lens, query_start_loc) -> causal paged GQA attention"),
    OpSpec("silu_mul", 1, silu_mul, "[gate | up] -> silu(gate) * up"),
    OpSpec("gelu_tanh_mul", 1, gelu_tanh_mul, "[gate | up] -> gelu_tanh(gate) * up"),
    OpSpec("gelu", 1, gelu, "x * Phi(x), the erf GELU", elementwise=True),
    OpSpec("gather_rows", 2, gather_rows, "x[indices]: the rows that need logits"),
    OpSpec("softcap", 1, softcap, "cap * tanh(x / cap); attr cap", elementwise=True),
    OpSpec("scale", 1, scale, "x * factor; attr factor", elementwise=True),
)
