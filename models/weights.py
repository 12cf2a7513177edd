"""Checkpoint tensors -> the graph's weights (fusec names, concatenated projections).

A source is anything with `get_f32(name)`; a naming scheme says which source tensors
make up each fusec weight. Weights come out in the storage form of the model dtype.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Protocol

import numpy as np
from tqdm import tqdm

from fusec.errors import ModelLoadError
from fusec.fusion.dtypes import DType, to_storage
from fusec.kernels.random import fill_random_reference, weight_fill
from fusec.models.config import ModelConfig
from fusec.models.llama import weight_shapes


class TensorSource(Protocol):
    def get_f32(self, name: str) -> np.ndarray: ...


def hf_names(cfg: ModelConfig, name: str) -> list[str]:
    """HF checkpoint tensors that make up fusec weight `name` (concatenated in order)."""
    if not name.startswith("layers."):
        return [{"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
                 "lm_head": "lm_head.weight"}[name]]
    _, i, part = name.split(".", 2)
    p = f"model.layers.{i}."
    return {
        "input_norm": [p + "input_layernorm.weight"],
        "qkv": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        "qkv_bias": [p + f"self_attn.{x}_proj.bias" for x in "qkv"],
        "o": [p + "self_attn.o_proj.weight"],
        "o_bias": [p + "self_attn.o_proj.bias"],
        "post_norm": [p + "post_attention_layernorm.weight"],
        "gate_up": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "down": [p + "mlp.down_proj.weight"],
    }[part]


def gguf_names(cfg: ModelConfig, name: str) -> list[str]:
    if not name.startswith("layers."):
        return [{"embed_tokens": "token_embd.weight", "norm": "output_norm.weight",
                 "lm_head": "output.weight"}[name]]
    _, i, part = name.split(".", 2)
    p = f"blk.{i}."
    return {
        "input_norm": [p + "attn_norm.weight"],
        "qkv": [p + f"attn_{x}.weight" for x in "qkv"],
        "qkv_bias": [p + f"attn_{x}.bias" for x in "qkv"],
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


def load_weights(cfg: ModelConfig, source: TensorSource, available: set[str],
                 naming: Callable[[ModelConfig, str], list[str]], dtype: DType,
                 fixup: Callable[[ModelConfig, str, np.ndarray], np.ndarray] | None = None,
                 desc: str = "loading weights") -> dict[str, np.ndarray]:
    shapes = weight_shapes(cfg)
    weights: dict[str, np.ndarray] = {}
    for name, shape in tqdm(shapes.items(), desc=desc, unit="tensor", disable=None, leave=False):
        parts = []
        for src in naming(cfg, name):
            if src not in available:
                raise ModelLoadError(f"checkpoint lacks tensor {src!r} (needed for {name})")
            t = source.get_f32(src)
            parts.append(fixup(cfg, src, t) if fixup else t)
        w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if w.shape != shape:
            raise ModelLoadError(f"tensor for {name} has shape {w.shape}, config implies {shape}")
        weights[name] = to_storage(w, dtype)
    return weights


class DummyWeights(Mapping[str, np.ndarray]):
    """Seeded random weights (`--load-format dummy`) with sane scales: norm weights near
    1, matrices with standard deviation 1/sqrt(fan-in). Each tensor is a FillRandom
    draw with its own stream: a GPU executor runs that kernel into device memory
    (`fills`), a host reader gets the same values from the kernel's numpy reference,
    made on first access."""

    def __init__(self, cfg: ModelConfig, dtype: DType, seed: int) -> None:
        self.dtype, self.seed = dtype, seed
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
            self._host[name] = to_storage(w.reshape(shape), self.dtype)
        return self._host[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)
