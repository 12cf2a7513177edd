"""Checkpoint tensors -> the graph's weights (fusec names, concatenated projections).

A source is anything with `get_f32(name)`; a naming scheme says which source tensors
make up each fusec weight. Weights come out in the storage form of the model dtype.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol, Union

import numpy as np
from tqdm import tqdm

from fusec.errors import ModelLoadError
from fusec.fusion.dtypes import DType, to_storage
from fusec.kernels.quant import BANDED, FORMATS, BlockFormat, band, bandable, quantize, storage_shape
from fusec.kernels.random import fill_random_reference, weight_fill
from fusec.models.config import ModelConfig
from fusec.models.families import weight_shapes


class TensorSource(Protocol):
    """Checkpoint tensors. A source whose `block_format` names a format for a tensor
    also has `get_blocks(name)`: its bytes as stored, [rows, bytes per row]."""

    def get_f32(self, name: str) -> np.ndarray: ...
    def block_format(self, name: str) -> str | None: ...  # None: not stored in a kernel block format
    def shape(self, name: str) -> tuple[int, ...]: ...  # in elements, numpy order; read from the header


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor's shape as the matrix its rows make: leading dims flattened (a GGUF
    expert stack [E, N, K] is [E * N, K], a vector [K] one row)."""
    return math.prod(shape[:-1]), shape[-1]


@dataclass(frozen=True)
class Part:
    """Rows [rows), or columns [cols), of checkpoint tensor `name` seen as a matrix
    (as_matrix), transposed after the cut if asked: a piece of a tensor that goes into a
    fusec weight (an expert of a GGUF expert stack, a shared expert cut into expert-sized
    parts, MLA's per-head halves of kv_b_proj). `whole`: the tensor's exact shape, where
    the naming knows it (checked before anything is read)."""

    name: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    transpose: bool = False
    whole: tuple[int, ...] | None = None

    def cut(self, t: np.ndarray, fmt: BlockFormat | None = None) -> np.ndarray:
        """The piece of t: elements, or with `fmt` its stored blocks [rows, bytes per row]
        (a column cut then falls on block boundaries: keeps_blocks)."""
        t = t.reshape(-1, t.shape[-1])
        if self.rows is not None:
            t = t[self.rows[0]:self.rows[1]]
        if self.cols is not None:
            c0, c1 = self.cols if fmt is None else (fmt.row_bytes(c) for c in self.cols)
            t = t[:, c0:c1]
        return np.ascontiguousarray(t.T if self.transpose else t)

    def keeps_blocks(self, fmt: BlockFormat) -> bool:
        """Whether the piece of a tensor stored in `fmt` is whole blocks of it."""
        return not self.transpose and (self.cols is None or all(c % fmt.block == 0 for c in self.cols))

    def shape(self, whole: tuple[int, ...]) -> tuple[int, ...]:
        n, k = as_matrix(whole)
        rows = self.rows[1] - self.rows[0] if self.rows else n
        cols = self.cols[1] - self.cols[0] if self.cols else k
        return (cols, rows) if self.transpose else (rows, cols)

    def fits(self, whole: tuple[int, ...]) -> bool:
        if self.whole is not None and tuple(whole) != self.whole:
            return False
        return len(whole) >= 1 and all(span is None or 0 <= span[0] < span[1] <= size
                                       for span, size in zip((self.rows, self.cols), as_matrix(whole)))


Source = Union[str, Part]  # a whole checkpoint tensor, or a piece of one


def source_name(src: Source) -> str:
    return src.name if isinstance(src, Part) else src


# Phi-3 checkpoints store q|k|v and gate|up already fused, in fusec's order
FUSED_IN_CHECKPOINT = {"phi3"}
# Gemma 2's norms: fusec's post_norm is the one before the MLP, which Gemma 2 calls
# pre_feedforward_layernorm; its post_attention_layernorm norms the attention's output
SANDWICH_HF = {"post_norm": "pre_feedforward_layernorm.weight", "attn_out_norm": "post_attention_layernorm.weight",
               "mlp_out_norm": "post_feedforward_layernorm.weight"}
SANDWICH_GGUF = {"post_norm": "ffn_norm.weight", "attn_out_norm": "post_attention_norm.weight",
                 "mlp_out_norm": "post_ffw_norm.weight"}


# GPT-NeoX: fusec name (the layer's part) -> (HF name, GGUF name) without the layer prefix
GPT_NEOX_PARTS = {
    "input_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "input_norm_bias": ("input_layernorm.bias", "attn_norm.bias"),
    "post_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "post_norm_bias": ("post_attention_layernorm.bias", "ffn_norm.bias"),
    "qkv": ("attention.query_key_value.weight", "attn_qkv.weight"),
    "qkv_bias": ("attention.query_key_value.bias", "attn_qkv.bias"),
    "o": ("attention.dense.weight", "attn_output.weight"), "o_bias": ("attention.dense.bias", "attn_output.bias"),
    "up": ("mlp.dense_h_to_4h.weight", "ffn_up.weight"), "up_bias": ("mlp.dense_h_to_4h.bias", "ffn_up.bias"),
    "down": ("mlp.dense_4h_to_h.weight", "ffn_down.weight"), "down_bias": ("mlp.dense_4h_to_h.bias", "ffn_down.bias"),
}
GPT_NEOX_TOP = {"embed_tokens": ("gpt_neox.embed_in.weight", "token_embd.weight"),
                "norm": ("gpt_neox.final_layer_norm.weight", "output_norm.weight"),
                "norm_bias": ("gpt_neox.final_layer_norm.bias", "output_norm.bias"),
                "lm_head": ("embed_out.weight", "output.weight")}


def _gpt_neox_name(name: str, gguf: bool) -> list[str]:
    if not name.startswith("layers."):
        return [GPT_NEOX_TOP[name][gguf]]
    _, i, part = name.split(".", 2)
    return [(f"blk.{i}." if gguf else f"gpt_neox.layers.{i}.") + GPT_NEOX_PARTS[part][gguf]]


# the sparse MLP's names: family -> (block, router, expert's gate / up / down, shared expert, its gate)
MOE_HF = {"mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2"), None, None),
          "qwen2_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_expert", "shared_expert_gate"),
          "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), None, None),
          "deepseek_v2": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_experts", None)}


def _moe_hf_names(cfg: ModelConfig, p: str, part: str) -> list[Source]:
    """A sparse MLP's stacked weights from per-expert tensors: each shared expert cut into
    expert-sized parts (gate and up rows, down columns)."""
    moe = cfg.moe
    assert moe is not None
    block, router, (gate, up, down), shared, shared_gate = MOE_HF[cfg.architecture]
    base, inter = f"{p}{block}.", moe.intermediate_size
    if part == "router":
        return [f"{base}{router}.weight"] + ([f"{base}{shared_gate}.weight"] if moe.shared_gate else [])
    spans = [(c * inter, (c + 1) * inter) for c in range(moe.shared)]
    if part == "experts_gate_up":
        return [f"{base}experts.{e}.{proj}.weight" for e in range(moe.experts) for proj in (gate, up)] + \
            [Part(f"{base}{shared}.{proj}.weight", rows=span) for span in spans for proj in (gate, up)]
    return [f"{base}experts.{e}.{down}.weight" for e in range(moe.experts)] + \
        [Part(f"{base}{shared}.{down}.weight", cols=span) for span in spans]


def _mla_hf_names(cfg: ModelConfig, p: str, part: str) -> list[Source]:
    """DeepSeek-V2's attention weights: queries regrouped as every head's no-rope part, then
    every head's rope part (each a contiguous slice for the kernels); kv_b_proj's per-head
    key half transposed for absorbing into queries (w_uk), its value half as is (w_uv)."""
    mla = cfg.mla
    assert mla is not None
    a, heads = p + "self_attn.", cfg.num_heads
    nope, rot, v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim

    def regrouped(proj: str) -> list[Source]:
        q = nope + rot
        return [Part(f"{a}{proj}.weight", rows=(h * q, h * q + nope)) for h in range(heads)] + \
            [Part(f"{a}{proj}.weight", rows=(h * q + nope, (h + 1) * q)) for h in range(heads)]

    kv_b = f"{a}kv_b_proj.weight"
    return {
        "qkv": lambda: regrouped("q_proj") + [a + "kv_a_proj_with_mqa.weight"],
        "q_a_kv_a": lambda: [a + "q_a_proj.weight", a + "kv_a_proj_with_mqa.weight"],
        "q_a_norm": lambda: [a + "q_a_layernorm.weight"],
        "q_b": lambda: regrouped("q_b_proj"),
        "kv_a_norm": lambda: [a + "kv_a_layernorm.weight"],
        "w_uk": lambda: [Part(kv_b, rows=(h * (nope + v), h * (nope + v) + nope), transpose=True)
                         for h in range(heads)],
        "w_uv": lambda: [Part(kv_b, rows=(h * (nope + v) + nope, (h + 1) * (nope + v))) for h in range(heads)],
    }[part]()


EXPERT_STACKS = ("experts_gate_up", "experts_down")  # a MoE layer's experts, one matrix each
MOE_PARTS = ("router", *EXPERT_STACKS)
MLA_PARTS = ("qkv", "q_a_kv_a", "q_a_norm", "q_b", "kv_a_norm", "w_uk", "w_uv")


def hf_names(cfg: ModelConfig, name: str) -> list[Source]:
    """HF checkpoint tensors (or parts of them) that make up fusec weight `name`
    (concatenated along rows, in order)."""
    if cfg.architecture == "gpt_neox":
        return _gpt_neox_name(name, gguf=False)
    if not name.startswith("layers."):
        return [{"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
                 "norm_bias": "model.norm.bias", "lm_head": "lm_head.weight"}[name]] if cfg.norm_bias or \
            name != "norm_bias" else []
    _, i, part = name.split(".", 2)
    p = f"model.layers.{i}."
    if part in MOE_PARTS:
        return _moe_hf_names(cfg, p, part)
    if cfg.mla is not None and part in MLA_PARTS:
        return _mla_hf_names(cfg, p, part)
    if cfg.architecture in FUSED_IN_CHECKPOINT and part in ("qkv", "gate_up"):
        return [p + ("self_attn.qkv_proj.weight" if part == "qkv" else "mlp.gate_up_proj.weight")]
    if cfg.sandwich_norms and part in SANDWICH_HF:
        return [p + SANDWICH_HF[part]]
    return {
        "input_norm": [p + "input_layernorm.weight"],
        "input_norm_bias": [p + "input_layernorm.bias"] if cfg.norm_bias else [],
        "post_norm_bias": [p + "post_attention_layernorm.bias"] if cfg.norm_bias else [],
        "qkv": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        "qkv_bias": [p + f"self_attn.{x}_proj.bias" for x in "qkv"],
        "q_norm": [p + "self_attn.q_norm.weight"],
        "k_norm": [p + "self_attn.k_norm.weight"],
        "o": [p + "self_attn.o_proj.weight"],
        "o_bias": [p + "self_attn.o_proj.bias"],
        "post_norm": [p + "post_attention_layernorm.weight"],
        "gate_up": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "down": [p + "mlp.down_proj.weight"],
    }[part]


def _moe_gguf_names(cfg: ModelConfig, p: str, part: str) -> list[Source]:
    """A sparse MLP's stacked weights from llama.cpp's expert stacks (ffn_{gate,up,down}_exps,
    [E, N, K]; gate and up rows interleaved expert by expert, down as stored) and its
    shared expert (ffn_*_shexp, cut into expert-sized parts as from HF)."""
    moe = cfg.moe
    assert moe is not None
    e, h, inter = moe.experts, cfg.hidden_size, moe.intermediate_size
    if part == "router":  # Qwen2-MoE's shared-expert gate is a vector [H]: one more row
        return [p + "ffn_gate_inp.weight"] + ([Part(p + "ffn_gate_inp_shexp.weight", whole=(h,))]
                                               if moe.shared_gate else [])
    spans = [(c * inter, (c + 1) * inter) for c in range(moe.shared)]
    whole_shared = moe.shared * inter
    if part == "experts_gate_up":
        return [Part(f"{p}ffn_{proj}_exps.weight", rows=(x * inter, (x + 1) * inter), whole=(e, inter, h))
                for x in range(e) for proj in ("gate", "up")] + \
            [Part(f"{p}ffn_{proj}_shexp.weight", rows=span, whole=(whole_shared, h))
             for span in spans for proj in ("gate", "up")]
    return [Part(p + "ffn_down_exps.weight", whole=(e, h, inter))] + \
        [Part(p + "ffn_down_shexp.weight", cols=span, whole=(h, whole_shared)) for span in spans]


def gguf_names(cfg: ModelConfig, name: str) -> list[Source]:
    if cfg.architecture == "gpt_neox":
        return _gpt_neox_name(name, gguf=True)
    if not name.startswith("layers."):
        return [{"embed_tokens": "token_embd.weight", "norm": "output_norm.weight",
                 "norm_bias": "output_norm.bias", "lm_head": "output.weight"}[name]] if cfg.norm_bias or \
            name != "norm_bias" else []
    _, i, part = name.split(".", 2)
    p = f"blk.{i}."
    if part in MOE_PARTS:
        return _moe_gguf_names(cfg, p, part)
    if cfg.architecture in FUSED_IN_CHECKPOINT and part in ("qkv", "gate_up"):
        return [p + ("attn_qkv.weight" if part == "qkv" else "ffn_up.weight")]
    if cfg.sandwich_norms and part in SANDWICH_GGUF:
        return [p + SANDWICH_GGUF[part]]
    return {
        "input_norm": [p + "attn_norm.weight"],
        "input_norm_bias": [p + "attn_norm.bias"] if cfg.norm_bias else [],
        "post_norm_bias": [p + "ffn_norm.bias"] if cfg.norm_bias else [],
        "qkv": [p + f"attn_{x}.weight" for x in "qkv"],
        "qkv_bias": [p + f"attn_{x}.bias" for x in "qkv"],
        "q_norm": [p + "attn_q_norm.weight"],
        "k_norm": [p + "attn_k_norm.weight"],
        "o": [p + "attn_output.weight"],
        "o_bias": [p + "attn_output.bias"],
        "post_norm": [p + "ffn_norm.weight"],
        "gate_up": [p + "ffn_gate.weight", p + "ffn_up.weight"],
        "down": [p + "ffn_down.weight"],
    }[part]


def unpermute_llama_gguf(cfg: ModelConfig, source_name: str, w: np.ndarray) -> np.ndarray:
    """Undo llama.cpp's row permutation of attn_q / attn_k (its interleaved RoPE layout)."""
    if cfg.architecture not in ("llama", "mixtral"):  # llama.cpp writes Mixtral as a llama
        return w
    if ".attn_q." in source_name:
        heads = cfg.num_heads
    elif ".attn_k." in source_name:
        heads = cfg.num_kv_heads
    else:
        return w
    rows = w.reshape(heads, cfg.head_dim // 2, 2, *w.shape[1:])
    return rows.swapaxes(1, 2).reshape(w.shape)


def gemma_norm_offset(cfg: ModelConfig, source_name: str, w: np.ndarray) -> np.ndarray:
    """Gemma's RMSNorm multiplies by (1 + w): fusec stores the sum (llama.cpp's converter
    writes GGUF norms the same way), so the norm is the Llama one."""
    if cfg.architecture in ("gemma", "gemma2") and source_name.endswith("norm.weight"):
        return (w.astype(np.float32) + np.float32(1.0)).astype(np.float32)
    return w


def hf_fixup(cfg: ModelConfig, source_name: str, w: np.ndarray) -> np.ndarray:
    """What HF tensors need before they are fusec's: Gemma's norm offset, GPT-NeoX's
    per-head q/k/v rows regrouped."""
    return gpt_neox_qkv(cfg, source_name, gemma_norm_offset(cfg, source_name, w))


def gpt_neox_qkv(cfg: ModelConfig, source_name: str, w: np.ndarray) -> np.ndarray:
    """GPT-NeoX's query_key_value rows (and bias) go head by head, q k v within each:
    regroup them as q | k | v (llama.cpp's converter does the same for GGUF)."""
    if cfg.architecture != "gpt_neox" or ".query_key_value." not in source_name:
        return w
    rows = w.reshape(cfg.num_heads, 3, cfg.head_dim, *w.shape[1:])
    return np.ascontiguousarray(rows.swapaxes(0, 1)).reshape(w.shape)


MIXED_PARTS = "q8_0"  # the format of a fused matrix whose parts are stored in different ones


Naming = Callable[[ModelConfig, str], list[Source]]
# matrices whose kernels read plain elements: Cohere's per-head norm weights, a router
# (its logits pick experts: kept exact), MLA's small per-head absorption matrices
DENSE_ONLY = ("norm", "router", "w_uk", "w_uv")


def weight_formats(cfg: ModelConfig, source: TensorSource | None, naming: Naming, native: bool, quantize_to: str | None
                   ) -> dict[str, str]:
    """The block format each matrix runs in (weights not listed run in the model dtype):
    `quantize_to` for every matrix whose rows hold whole blocks (online quantization),
    else, when `native`, the source's own format where all its parts share one, and
    q8_0 where a fused matrix joins parts in different block formats (a Q4_K_M file's
    q and k in q4_k beside v in q6_k) or a piece that splits its tensor's blocks: one
    format per kernel, re-quantized at load with 8 bits per weight, finer than any of
    the parts."""
    formats: dict[str, str] = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) != 2 or name.endswith(DENSE_ONLY):
            continue
        if quantize_to is not None:
            if shape[1] % FORMATS[quantize_to].block == 0:
                formats[name] = quantize_to
            continue
        if native and source is not None:
            kinds = {_stored_format(source, src) for src in naming(cfg, name)}
            if None in kinds:
                continue
            if len(kinds) == 1 and UNALIGNED not in kinds:
                formats[name] = kinds.pop()
            elif shape[1] % FORMATS[MIXED_PARTS].block == 0:
                formats[name] = MIXED_PARTS
    return formats


def banded_formats(cfg: ModelConfig, formats: Mapping[str, str]) -> dict[str, str]:
    """formats with every matrix that has a banded form (kernels/quant.py: a q8_0 / q4_0 /
    q4_1 matrix's rows, or each expert's in a stack, in whole bands) in it: the layout the
    host's int8 dots read."""
    shapes = weight_shapes(cfg)

    def rows(name: str) -> int | None:  # an expert's rows in a stack of them
        return shapes[name][0] // (cfg.moe.experts + cfg.moe.shared) if name.endswith(EXPERT_STACKS) else None
    return {name: BANDED[f] if bandable(f, shapes[name], rows(name)) else f for name, f in formats.items()}


def unbanded_formats(formats: Mapping[str, str]) -> dict[str, str]:
    """formats with each banded form back in its GGUF format."""
    return {name: FORMATS[f].gguf_name for name, f in formats.items()}


UNALIGNED = "unaligned"  # a column cut of a block-format tensor that splits blocks


def _stored_format(source: TensorSource, src: Source) -> str | None:
    """The block format src's elements are stored in (None: plain elements), UNALIGNED
    where src is a piece that does not keep the tensor's blocks whole."""
    kind = source.block_format(source_name(src))
    if kind is None or not isinstance(src, Part) or src.keeps_blocks(FORMATS[kind]):
        return kind
    return UNALIGNED


def load_weights(cfg: ModelConfig, source: TensorSource, available: set[str], naming: Naming, dtype: DType,
                 formats: Mapping[str, str],
                 fixup: Callable[[ModelConfig, str, np.ndarray], np.ndarray] | None = None,
                 desc: str = "loading weights") -> dict[str, np.ndarray]:
    """Each weight in its run form: a block format's bytes (as stored, or quantized now)
    or the model dtype's storage. Row fixups and concatenations work on byte rows too."""
    shapes = weight_shapes(cfg)
    _check_shapes(cfg, source, available, naming, shapes)  # before reading (allocating) any
    weights: dict[str, np.ndarray] = {}
    for name in tqdm(shapes, desc=desc, unit="tensor", disable=None, leave=False):
        sources = naming(cfg, name)
        if not sources:  # not in the checkpoint: zeros by the family's definition (Cohere's norm biases)
            weights[name] = to_storage(np.zeros(shapes[name], np.float32), dtype)
            continue
        fmt = FORMATS[formats[name]] if name in formats else None
        # a banded form is read in its GGUF format's blocks, banded once whole
        stored = FORMATS[fmt.gguf_name] if fmt is not None and all(
            _stored_format(source, src) == fmt.gguf_name for src in sources) else None
        parts, read = [], {}  # read: each tensor once, however many parts it gives
        for src in sources:
            base = source_name(src)
            if base not in read:
                t = source.get_blocks(base) if stored else source.get_f32(base)  # type: ignore[attr-defined]
                _check_finite(base, t, stored)
                read[base] = fixup(cfg, base, t) if fixup else t
            parts.append(src.cut(read[base], stored) if isinstance(src, Part) else read[base])
        w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if stored:
            weights[name] = band(w, fmt) if fmt.banded else w
        elif fmt is not None:
            weights[name] = quantize(w, fmt)
        else:
            weights[name] = to_storage(w, dtype)
    return weights


def _part_shapes(cfg: ModelConfig, name: str, shape: tuple[int, ...], parts: int) -> list[tuple[int, ...] | None]:
    """The shapes of the `parts` source tensors (or pieces) that weight `name`
    concatenates along rows, where the config says each (None: only their sum is known)."""
    if parts <= 1:  # no source: a weight the family defines as zeros (Cohere's norm biases)
        return [shape][:parts]
    part = name.rsplit(".", 1)[-1]
    if part in EXPERT_STACKS:  # expert-sized pieces
        return [(shape[0] // parts, *shape[1:])] * parts
    rows = {"qkv": (cfg.q_size, cfg.kv_size, cfg.kv_size), "qkv_bias": (cfg.q_size, cfg.kv_size, cfg.kv_size),
            "gate_up": (cfg.intermediate_size,) * 2, "router": (shape[0] - 1, 1)}.get(part)
    if cfg.mla is not None and part in MLA_PARTS:
        rows = None  # MLA's pieces: their sum is checked
    return [None] * parts if rows is None else [(r, *shape[1:]) for r in rows]


def _check_shapes(cfg: ModelConfig, source: TensorSource, available: set[str], naming: Naming,
                  shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor the config implies is in the checkpoint with the shape it implies."""
    for name, shape in shapes.items():
        sources = naming(cfg, name)
        got = []
        for src, want in zip(sources, _part_shapes(cfg, name, shape, len(sources)), strict=True):
            base = source_name(src)
            if base not in available:
                raise ModelLoadError(f"checkpoint lacks tensor {base!r} (needed for {name})")
            whole = source.shape(base)
            if isinstance(src, Part) and not src.fits(whole):
                implied = "the config implies " + str(list(src.whole)) if src.whole else "too small for the config's"
                raise ModelLoadError(f"tensor {base!r} has shape {list(whole)}, {implied} ({name})")
            if isinstance(src, Part) and src.whole is not None:
                want = None  # checked whole: its pieces are the config's
            got.append(src.shape(whole) if isinstance(src, Part) else whole)
            if want is not None and got[-1] != want:
                raise ModelLoadError(f"tensor {base!r} has shape {list(whole)}, the config implies {list(want)}")
        if got and (any(g[1:] != shape[1:] for g in got) or sum(g[0] for g in got) != shape[0]):
            raise ModelLoadError(f"the tensors of {name} ({', '.join(map(source_name, sources))}) have shapes "
                                 f"{[list(g) for g in got]}, the config implies {list(shape)} in all")


def _check_finite(src: str, t: np.ndarray, fmt: BlockFormat | None) -> None:
    """Refuse NaN or infinite weights: a dense tensor's values, or a block format's
    float16 scales (corrupt quantized bytes decode to finite garbage, but one random
    scale in 32 is NaN or infinite). Bit tests on the scales' exponents: nothing is decoded."""
    if fmt is None:
        bad = not np.isfinite(t).all()
    else:
        halves = t.reshape(-1, fmt.nbytes).view(np.uint16)
        bad = any(((halves[:, at // 2] & 0x7C00) == 0x7C00).any() for at in fmt.scale_at)
    if bad:
        raise ModelLoadError(f"tensor {src!r} holds NaN or infinite values")


def weight_nbytes(cfg: ModelConfig, dtype: DType, formats: Mapping[str, str]) -> dict[str, int]:
    """Each weight's bytes in its run form: a block format's bytes, else `dtype`'s."""
    return {name: math.prod(storage_shape(shape, FORMATS[formats[name]])) if name in formats
            else math.prod(shape) * dtype.itemsize for name, shape in weight_shapes(cfg).items()}


def weights_nbytes(cfg: ModelConfig, dtype: DType, formats: Mapping[str, str]) -> int:
    """Bytes of all the weights in their run form."""
    return sum(weight_nbytes(cfg, dtype, formats).values())


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class DummyWeights(Mapping[str, np.ndarray]):
    """Seeded random weights (`--load-format dummy`) with sane scales: norm weights near
    1, matrices with standard deviation 1/sqrt(fan-in). Each tensor is a FillRandom
    draw with its own stream: a GPU executor runs that kernel into device memory
    (`fills`), a host reader gets the same values from the kernel's numpy reference,
    made on first access."""

    def __init__(self, cfg: ModelConfig, dtype: DType, seed: int, formats: Mapping[str, str] | None = None) -> None:
        self.dtype, self.seed = dtype, seed
        self.formats = dict(formats or {})  # matrices quantized to a block format after the draw
        need, have = weights_nbytes(cfg, dtype, self.formats), _physical_memory()
        if need > have:  # no file bounds these: refuse before drawing any
            raise ModelLoadError(f"--load-format dummy: the config's weights need {need} bytes "
                                 f"({need / 2**30:.1f} GiB), more than this machine's {have / 2**30:.1f} GiB")
        self.shapes = weight_shapes(cfg)
        self._host: dict[str, np.ndarray] = {}

    def fills(self) -> Iterator[tuple[str, tuple[int, ...], int, float, float]]:
        """(name, shape, stream, scale, shift) per tensor."""
        for stream, (name, shape) in enumerate(self.shapes.items()):
            yield (name, shape, stream, *weight_fill(name, shape))

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._host:
            shape = self.shapes[name]  # KeyError for a name the model lacks
            stream = list(self.shapes).index(name)
            w = fill_random_reference(int(np.prod(shape)), self.seed, stream, *weight_fill(name, shape))
            fmt = self.formats.get(name)
            w = w.reshape(shape)
            self._host[name] = quantize(w, FORMATS[fmt]) if fmt else to_storage(w, self.dtype)
        return self._host[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)
