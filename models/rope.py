"""Rotary-embedding inverse frequencies, with the scaling schemes of Llama checkpoints."""
from __future__ import annotations

import math

import numpy as np

from fusec.errors import UnsupportedModelError
from fusec.models.config import ModelConfig


def inv_freq(config: ModelConfig, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """float32 inverse frequencies, one per rotary pair (head_dim / 2 of them)."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    params = config.rope_scaling
    kind = params.get("rope_type", "default")
    if kind == "default":
        return base
    if kind == "linear":
        return (base / np.float32(params["factor"])).astype(np.float32)
    if kind == "llama3":
        try:
            return _llama3(base, params)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise UnsupportedModelError(f"llama3 rope scaling needs factor, low_freq_factor, high_freq_factor and "
                                        f"original_max_position_embeddings ({type(e).__name__}: {e})") from None
    if kind == "freq_factors":
        if freq_factors is None or freq_factors.shape != base.shape:
            raise UnsupportedModelError("rope_freqs tensor missing or of the wrong size")
        return (base / freq_factors.astype(np.float32)).astype(np.float32)
    raise UnsupportedModelError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


def _llama3(base: np.ndarray, p: dict) -> np.ndarray:
    factor = float(p["factor"])
    low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / base
    scaled = np.where(wavelen > low_wavelen, base / factor, base)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
