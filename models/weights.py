"""Checkpoint tensors -> the graph's weights (fusec names, concatenated projections).

A source is anything with `get_f32(name)`; a naming scheme says which source tensors
make up each fusec weight. Weights come out in the storage form of the model dtype.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np
from tqdm import tqdm

from fusec.errors import ModelLoadError
from fusec.fusion.dtypes import DType, to_storage
from fusec.kernels.quant import FORMATS, BlockFormat, quantize, storage_shape
from fusec.kernels.random import fill_random_reference, weight_fill
from fusec.models.config import ModelConfig
from fusec.models.families import weight_shapes


class TensorSource(Protocol):
    """Checkpoint tensors. A source whose `block_format` names a format for a tensor
    also has `get_blocks(name)`: its bytes as stored, [rows, bytes per row]."""

    def get_f32(self, name: str) -> np.ndarray: ...
    def block_format(self, name: str) -> str | None: ...  # None: not stored in a kernel block format
    def shape(self, name: str) -> tuple[int, ...]: ...  # in elements, numpy order; read from the header


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


def hf_names(cfg: ModelConfig, name: str) -> list[str]:
    """HF checkpoint tensors that make up fusec weight `name` (concatenated in order)."""
    if cfg.architecture == "gpt_neox":
        return _gpt_neox_name(name, gguf=False)
    if not name.startswith("layers."):
        return [{"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
                 "norm_bias": "model.norm.bias", "lm_head": "lm_head.weight"}[name]] if cfg.norm_bias or \
            name != "norm_bias" else []
    _, i, part = name.split(".", 2)
    p = f"model.layers.{i}."
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


def gguf_names(cfg: ModelConfig, name: str) -> list[str]:
    if cfg.architecture == "gpt_neox":
        return _gpt_neox_name(name, gguf=True)
    if not name.startswith("layers."):
        return [{"embed_tokens": "token_embd.weight", "norm": "output_norm.weight",
                 "norm_bias": "output_norm.bias", "lm_head": "output.weight"}[name]] if cfg.norm_bias or \
            name != "norm_bias" else []
    _, i, part = name.split(".", 2)
    p = f"blk.{i}."
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
    if cfg.architecture != "llama":
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


def weight_formats(cfg: ModelConfig, source: TensorSource | None,
                   naming: Callable[[ModelConfig, str], list[str]], native: bool, quantize_to: str | None
                   ) -> dict[str, str]:
    """The block format each matrix runs in (weights not listed run in the model dtype):
    `quantize_to` for every matrix whose rows hold whole blocks (online quantization),
    else, when `native`, the source's own format where all its parts share one, and
    q8_0 where a fused matrix joins parts in different block formats (a Q4_K_M file's
    q and k in q4_k beside v in q6_k): one format per kernel, re-quantized at load with
    8 bits per weight, finer than any of the parts."""
    formats: dict[str, str] = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) != 2 or name.endswith("norm"):  # matrices only: not Cohere's per-head norm weights
            continue
        if quantize_to is not None:
            if shape[1] % FORMATS[quantize_to].block == 0:
                formats[name] = quantize_to
            continue
        if native and source is not None:
            kinds = {source.block_format(src) for src in naming(cfg, name)}
            if None in kinds:
                continue
            formats[name] = kinds.pop() if len(kinds) == 1 else MIXED_PARTS
    return formats


def load_weights(cfg: ModelConfig, source: TensorSource, available: set[str],
                 naming: Callable[[ModelConfig, str], list[str]], dtype: DType, formats: Mapping[str, str],
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
        stored = fmt is not None and all(source.block_format(src) == fmt.name for src in sources)
        parts = []
        for src in sources:
            t = source.get_blocks(src) if stored else source.get_f32(src)  # type: ignore[attr-defined]
            _check_finite(src, t, fmt if stored else None)
            parts.append(fixup(cfg, src, t) if fixup else t)
        w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if stored:
            weights[name] = w
        elif fmt is not None:
            weights[name] = quantize(w, fmt)
        else:
            weights[name] = to_storage(w, dtype)
    return weights


def _part_shapes(cfg: ModelConfig, name: str, shape: tuple[int, ...], parts: int) -> list[tuple[int, ...]]:
    """The shapes of the `parts` source tensors that weight `name` concatenates along rows."""
    if parts <= 1:  # no source: a weight the family defines as zeros (Cohere's norm biases)
        return [shape][:parts]
    rows = {"qkv": (cfg.q_size, cfg.kv_size, cfg.kv_size), "qkv_bias": (cfg.q_size, cfg.kv_size, cfg.kv_size),
            "gate_up": (cfg.intermediate_size,) * 2}.get(name.rsplit(".", 1)[-1])
    return [shape] if rows is None else [(r, *shape[1:]) for r in rows]


def _check_shapes(cfg: ModelConfig, source: TensorSource, available: set[str],
                  naming: Callable[[ModelConfig, str], list[str]], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor the config implies is in the checkpoint with the shape it implies."""
    for name, shape in shapes.items():
        sources = naming(cfg, name)
        for src, want in zip(sources, _part_shapes(cfg, name, shape, len(sources)), strict=True):
            if src not in available:
                raise ModelLoadError(f"checkpoint lacks tensor {src!r} (needed for {name})")
            if source.shape(src) != want:
                raise ModelLoadError(f"tensor {src!r} has shape {list(source.shape(src))}, "
                                     f"the config implies {list(want)}")


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


def weights_nbytes(cfg: ModelConfig, dtype: DType, formats: Mapping[str, str]) -> int:
    """Bytes of the weights in their run form: block formats' bytes, else `dtype`'s."""
    return sum(math.prod(storage_shape(shape, FORMATS[formats[name]])) if name in formats
               else math.prod(shape) * dtype.itemsize for name, shape in weight_shapes(cfg).items())


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
