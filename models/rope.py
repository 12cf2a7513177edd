"""Rotary-embedding inverse frequencies, with the scaling schemes of Llama and Phi-3
checkpoints, and the factor some of them scale cos and sin by."""
from __future__ import annotations

import math

import numpy as np

from fusec.errors import UnsupportedModelError
from fusec.models.config import ModelConfig, yarn_mscale


def inv_freq(config: ModelConfig, freq_factors: np.ndarray | None = None,
             max_model_len: int | None = None) -> np.ndarray:
    """float32 inverse frequencies, one per rotary pair (rotary_dim / 2 of them: a partial
    rotary embedding turns only the first rotary_dim of each head's dims).
    `max_model_len` picks LongRoPE's factors: the long ones when the served context goes
    past the original one (vLLM's and llama.cpp's choice, fixed for the whole run, so
    cached keys and new queries always agree)."""
    dim = config.rotary_dim
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
    if kind == "longrope":
        long = (max_model_len or config.max_position_embeddings) > _original_len(config)
        factors = np.asarray(params["long_factor" if long else "short_factor"], dtype=np.float32)
        if factors.shape != base.shape:
            raise UnsupportedModelError(f"longrope factors: {factors.size} given, the rotary dims need {base.size}")
        return (base / factors).astype(np.float32)
    if kind == "yarn":
        try:
            return _yarn(base, config)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise UnsupportedModelError(f"yarn rope scaling needs factor and original_max_position_embeddings "
                                        f"({type(e).__name__}: {e})") from None
    if kind == "freq_factors":
        if freq_factors is None or freq_factors.shape != base.shape:
            raise UnsupportedModelError("rope_freqs tensor missing or of the wrong size")
        return (base / freq_factors.astype(np.float32)).astype(np.float32)
    raise UnsupportedModelError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3, longrope, "
                                f"yarn")


def attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by: LongRoPE's attention factor (given, or
    sqrt(1 + ln(s) / ln(original length)) for s = max_position_embeddings / original
    length, as transformers derives it); 1 for the other schemes."""
    params = config.rope_scaling
    if params.get("rope_type") == "yarn":
        if params.get("attention_factor") is not None:
            return float(params["attention_factor"])
        factor, mscale, all_dims = float(params["factor"]), params.get("mscale"), params.get("mscale_all_dim")
        if mscale and all_dims:
            return yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(all_dims))
        return yarn_mscale(factor)
    if params.get("rope_type") != "longrope":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    original = _original_len(config)
    scale = float(params.get("factor") or config.max_position_embeddings / original)
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


def _original_len(config: ModelConfig) -> int:
    original = config.rope_scaling.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original < 2:
        raise UnsupportedModelError(f"longrope needs original_max_position_embeddings, got {original!r}")
    return original


def _yarn(base: np.ndarray, config: ModelConfig) -> np.ndarray:
    """YaRN: interpolated frequencies (base / factor) for the slow dims, the original
    ones for the fast dims, a linear ramp between (transformers' _compute_yarn_parameters)."""
    p = config.rope_scaling
    factor, original = float(p["factor"]), float(p["original_max_position_embeddings"])
    dim, theta = config.rotary_dim, config.rope_theta
    fast, slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (base / np.float32(factor) * (1 - extrapolation) + base * extrapolation).astype(np.float32)


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
