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


def _gated(x: np.ndarray, groups: int, act: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """x[T, groups * 2I], each group [gate | up] -> [T, groups * I] of act(gate) * up."""
    t = x.shape[0]
    xg = x.reshape(t, groups, -1)
    half = xg.shape[-1] // 2
    return (act(xg[..., :half]) * xg[..., half:]).reshape(t, groups * half)


def silu_mul(x: np.ndarray, *, groups: int = 1) -> np.ndarray:
    """x = [gate | up] along the last axis -> silu(gate) * up; with `groups`, each of the
    row's `groups` equal parts is a [gate | up] of its own (one per routed expert slot)."""
    return _gated(x, groups, lambda gate: gate / (1.0 + np.exp(-gate)))


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


def gelu_tanh_mul(x: np.ndarray, *, groups: int = 1) -> np.ndarray:
    """x = [gate | up] along the last axis -> gelu_tanh(gate) * up (GeGLU, Gemma's MLP);
    `groups` as for silu_mul."""
    def act(gate: np.ndarray) -> np.ndarray:
        inner = np.float32(0.7978845608028654) * (gate + np.float32(0.044715) * gate ** 3)
        return np.float32(0.5) * gate * (np.float32(1.0) + np.tanh(inner))
    return _gated(x, groups, act)


# -- mixture of experts -------------------------------------------------------------------
def moe_route(x: np.ndarray, w: np.ndarray, *, experts: int, top_k: int, shared: int = 0, shared_gate: bool = False,
              renormalize: bool = False, scaling: float = 1.0, n_group: int = 1, topk_group: int = 1) -> np.ndarray:
    """The router: logits = x @ w.T in float32 (w[experts (+1 with shared_gate), H]),
    softmax over the `experts` routed ones, the top_k (largest first, the lower index
    first on ties; with n_group > 1 only among the topk_group groups whose best expert
    scores highest: DeepSeek's group-limited greedy, the rest masked to 0), their
    weights renormalized to sum 1 if asked, times `scaling` (routed_scaling_factor).
    Then `shared` always-on slots: experts experts..experts+shared-1 (a shared expert
    stored as equal parts after the routed ones) of weight 1, or sigmoid(logit of w's
    last row) with shared_gate (Qwen2-MoE's shared_expert_gate).

    Returns route[T, 2 * S], S = top_k + shared: the slots' expert ids (as float32,
    exact) then their weights."""
    logits = x.astype(np.float32) @ w.astype(np.float32).T
    routed = logits[:, :experts]
    scores = np.exp(routed - routed.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    if n_group > 1:
        t = scores.shape[0]
        group_best = scores.reshape(t, n_group, experts // n_group).max(axis=-1)
        keep = np.argsort(-group_best, axis=-1, kind="stable")[:, :topk_group]
        mask = np.zeros((t, n_group), bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        scores = np.where(np.repeat(mask, experts // n_group, axis=-1), scores, np.float32(0.0))
    ids = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    weights = weights * np.float32(scaling)
    if shared:
        t = x.shape[0]
        ids = np.concatenate([ids, np.broadcast_to(np.arange(experts, experts + shared), (t, shared))], axis=-1)
        gate = 1.0 / (1.0 + np.exp(-logits[:, experts:experts + 1])) if shared_gate else np.ones((t, 1), np.float32)
        weights = np.concatenate([weights, np.broadcast_to(gate, (t, shared))], axis=-1)
    return np.concatenate([ids.astype(np.float32), weights.astype(np.float32)], axis=-1)


def moe_matmul(x: np.ndarray, route: np.ndarray, w: np.ndarray, *, experts: int, slots: int,
               combine: bool = False) -> np.ndarray:
    """Each token's routed experts: w[experts * N, K] holds the experts' [N, K] matrices
    one after another; route[T, 2 * slots] is moe_route's. Slot j of token t applies
    expert route[t, j] to x[t] (x[T, K], shared by the slots) or to x[t]'s j-th part
    (x[T, slots * K]). Returns every slot's [N] side by side, [T, slots * N], or with
    `combine` their sum weighted by route[t, slots + j], [T, N]."""
    t = x.shape[0]
    n, k = w.shape[0] // experts, w.shape[1]
    mats = w.reshape(experts, n, k)
    ids = route[:, :slots].astype(np.int64)
    parts = x.reshape(t, slots, k) if x.shape[1] == slots * k else np.broadcast_to(x[:, None, :], (t, slots, k))
    y = np.einsum("tsk,tsnk->tsn", parts, mats[ids])
    if combine:
        return np.einsum("tsn,ts->tn", y, route[:, slots:])
    return y.reshape(t, slots * n)


# -- multi-head latent attention (DeepSeek-V2) ------------------------------------------------
def head_matmul(x: np.ndarray, w: np.ndarray, *, heads: int) -> np.ndarray:
    """A matrix per head: x[T, heads * K] head h times w[heads * N, K]'s h-th [N, K]
    block -> [T, heads * N] (MLA's per-head absorption of the latent up-projections)."""
    t = x.shape[0]
    k = w.shape[1]
    mats = w.reshape(heads, -1, k)
    return np.einsum("thk,hnk->thn", x.reshape(t, heads, k), mats).reshape(t, -1)


def latent_write(latent: np.ndarray, k_pe: np.ndarray, cache: np.ndarray, slot_mapping: np.ndarray) -> np.ndarray:
    """MLA's paged cache (in place): each token's [latent | k_pe] row into its slot of
    cache[1, NB, block_size, 1, rank + rope_dim] (one half, one head)."""
    block_size = cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    cache[0, slots // block_size, slots % block_size, 0] = np.concatenate([latent[valid], k_pe[valid]], axis=-1)
    return cache


def mla_attention(q_latent: np.ndarray, q_pe: np.ndarray, cache: np.ndarray, block_tables: np.ndarray,
                  context_lens: np.ndarray, query_start_loc: np.ndarray, *, n_heads: int,
                  scale: float) -> np.ndarray:
    """Causal attention over MLA's latent cache, in the absorbed form: head h of a new
    token scores cached row c = [latent | k_pe] as (q_latent_h . latent + q_pe_h . k_pe)
    * scale and returns the softmax-weighted sum of the latents, [T, n_heads * rank]
    (q_latent[T, n_heads * rank], q_pe[T, n_heads * rope_dim])."""
    t = q_latent.shape[0]
    block_size, width = cache.shape[2], cache.shape[4]
    rank = q_latent.shape[1] // n_heads
    ql = q_latent.reshape(t, n_heads, rank)
    qp = q_pe.reshape(t, n_heads, width - rank)
    out = np.zeros((t, n_heads, rank), dtype=np.float32)
    for s in range(len(context_lens)):
        a, b = int(query_start_loc[s]), int(query_start_loc[s + 1])
        n_new, ctx = b - a, int(context_lens[s])
        if n_new == 0:
            continue
        rows = cache[0, block_tables[s, : -(-ctx // block_size)], :, 0].reshape(-1, width)[:ctx]
        latent, k_pe = rows[:, :rank], rows[:, rank:]
        scores = (np.einsum("qhr,kr->hqk", ql[a:b], latent) + np.einsum("qhd,kd->hqk", qp[a:b], k_pe)) \
            * np.float32(scale)
        mask = np.arange(ctx)[None, :] <= np.arange(ctx - n_new, ctx)[:, None]
        scores = np.where(mask[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[a:b] = np.einsum("hqk,kr->qhr", p, latent)
    return out.reshape(t, n_heads * rank)


def gather_rows(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return x[indices]


# An op whose output IS one of its inputs (at this position), updated in place: the KV cache.
IN_PLACE = {"kv_write": 2, "latent_write": 2}

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
    OpSpec("silu_mul", 1, silu_mul, "[gate | up] -> silu(gate) * up (per group of the row: attr groups)"),
    OpSpec("gelu_tanh_mul", 1, gelu_tanh_mul, "[gate | up] -> gelu_tanh(gate) * up (attr groups)"),
    OpSpec("moe_route", 2, moe_route, "router logits, softmax, top-k (+ shared slots) -> [T, 2S] ids | weights"),
    OpSpec("moe_matmul", 3, moe_matmul, "(x, route, w[E*N, K]) -> each slot's expert applied [T, S*N] "
                                         "(or weighted sum [T, N] with combine)", split_output=True),
    OpSpec("head_matmul", 2, head_matmul, "x[T, H*K] @ per-head w[H*N, K] -> [T, H*N]", split_output=True),
    OpSpec("latent_write", 4, latent_write, "(latent, k_pe, cache, slot_mapping) -> MLA cache with rows written"),
    OpSpec("mla_attention", 6, mla_attention,
           "(q_latent, q_pe, cache, block_tables, context_lens, query_start_loc) -> latent attention"),
    OpSpec("gelu", 1, gelu, "x * Phi(x), the erf GELU", elementwise=True),
    OpSpec("gather_rows", 2, gather_rows, "x[indices]: the rows that need logits"),
    OpSpec("softcap", 1, softcap, "cap * tanh(x / cap); attr cap", elementwise=True),
    OpSpec("scale", 1, scale, "x * factor; attr factor", elementwise=True),
)
