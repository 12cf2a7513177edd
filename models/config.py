"""Model configuration, read from an HF config.json or GGUF metadata."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from fusec.errors import ModelLoadError, UnsupportedModelError

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "StableLmForCausalLM": "stablelm",
    "GPTNeoXForCausalLM": "gpt_neox",
    "CohereForCausalLM": "cohere",
}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "stablelm", "gptneox", "command-r")
GGUF_FAMILY = {"gptneox": "gpt_neox", "command-r": "cohere"}  # llama.cpp's names that differ from fusec's
LAYER_NORMED = ("stablelm", "gpt_neox", "cohere")  # families whose norms are LayerNorms (Cohere's without bias)
GEMMAS = ("gemma", "gemma2")
# a gated MLP's activation (HF hidden_act) -> the graph's op kind
GATED_ACTIVATIONS = {"silu": "silu_mul", "gelu_pytorch_tanh": "gelu_tanh_mul", "gelu_tanh": "gelu_tanh_mul"}
# Upper bounds on a config's sizes, far past any released model of these families
# (Llama-3.1-405B: 126 layers, hidden 16384, FFN 53248, 128 query heads; vocabularies up
# to ~256k; contexts up to 10M), so that a corrupt or hostile config fails at once rather
# than after sizing tables from it. The weights these allow are checked against the files
# or, for dummy weights, the machine's memory (weights.py).
SIZE_LIMITS = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_layers": 1024,
    "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024, "max_position_embeddings": 1 << 24,
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a value of HF_ARCHITECTURES: one graph builder serves them all
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the norms' eps (a LayerNorm's too)
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False  # RMSNorm of each q and k head before RoPE (Qwen3)
    qk_layer_norm: bool = False  # a bias-free LayerNorm of each q and k head, weights per head (Cohere)
    partial_rotary_factor: float = 1.0  # the fraction of each head's dims that RoPE turns
    mlp_gate: str = "silu_mul"  # the gated MLP's op kind: "silu_mul", or "gelu_tanh_mul" (Gemma's GeGLU)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    # Gemma 2: an RMSNorm on each block's output before its residual add ("sandwich" norms),
    # attention scores and final logits soft-capped, attention scaled by
    # query_pre_attn_scalar ** -0.5, the sliding window only on the layers it names
    sandwich_norms: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # None: head_dim
    sliding_layers: tuple[int, ...] | None = None  # layers with the sliding window; None: all
    norm: str = "rms_norm"  # or "layer_norm": LayerNorm with a bias (StableLM, GPT-NeoX)
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX; Cohere: one norm for both)
    norm_bias: bool = True  # a LayerNorm's bias (Cohere's have none: zeros)
    logit_scale: float | None = None  # logits times this (Cohere)
    interleaved_rope: bool = False  # GPT-J's rotary pairs (2j, 2j + 1) (Cohere)
    # rope_type plus its parameters, in HF's naming ("default", "linear", "llama3").
    rope_scaling: Mapping[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Checked before anything is sized from the config: an absurd size fails here in
        # microseconds instead of allocating for minutes first.
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ModelLoadError(f"config: {name} must be an integer in 1..{limit}, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ModelLoadError(f"config: {name} must be a positive finite number, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ModelLoadError(f"partial_rotary_factor={self.partial_rotary_factor} does not give an even number "
                                 f"of rotary dims out of head_dim={self.head_dim}")

    @property
    def rotary_dim(self) -> int:
        """The dims of each head RoPE turns (transformers' int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _require(cfg: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ModelLoadError(f"{source}: missing {key!r}")
    return cfg[key]


def _int(value: Any, key: str, source: str) -> int:
    """A config integer as HF and GGUF write them: never a float, bool or string, which
    int() would quietly truncate or parse (hidden_size 64.5 is a corrupt config)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ModelLoadError(f"{source}: {key} must be an integer, got {value!r}")
    return int(value)


def _head_dim(explicit: Any, hidden: int, heads: int, key: str, source: str) -> int:
    """The explicit head size, else hidden / heads, which must then divide evenly."""
    if explicit:
        return _int(explicit, key, source)
    if heads <= 0 or hidden % heads:
        raise ModelLoadError(f"{source}: hidden size {hidden} is not a multiple of {heads} attention heads")
    return hidden // heads


def _eos_ids(value: Any, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else (value,)
    return tuple(_int(v, "eos_token_id", source) for v in values)


def config_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    try:
        return _config_from_hf(cfg, source)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{source}: invalid config ({type(e).__name__}: {e})") from None


def _config_from_hf(cfg: Mapping[str, Any], source: str) -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        name = ", ".join(archs) or cfg.get("model_type", "unknown")
        raise UnsupportedModelError(
            f"{source}: unsupported architecture {name}; supported: {', '.join(HF_ARCHITECTURES)}")
    # Gemma v1 configs name the activation hidden_activation (hidden_act "gelu" was a misnomer)
    act = (cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")) if arch in GEMMAS else \
        cfg.get("hidden_act", "silu")
    if act == "gelu" and arch in GEMMAS:
        act = "gelu_pytorch_tanh"
    if arch == "gpt_neox":  # a non-gated MLP: its activation is the builder's
        if act != "gelu":
            raise UnsupportedModelError(f"{source}: unsupported GPT-NeoX hidden_act {act!r}; supported: gelu")
        act = "silu"
    if act not in GATED_ACTIVATIONS:
        raise UnsupportedModelError(f"{source}: unsupported hidden_act {act!r}; supported: "
                                    f"{', '.join(GATED_ACTIVATIONS)}")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias is not supported")
    if arch == "stablelm" and cfg.get("qk_layernorm"):
        raise UnsupportedModelError(f"{source}: StableLM with qk_layernorm (per-head LayerNorms) is not supported")
    if arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: {arch} use_sliding_window is not supported")
    hidden = _int(_require(cfg, "hidden_size", source), "hidden_size", source)
    heads = _int(_require(cfg, "num_attention_heads", source), "num_attention_heads", source)
    # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    if rope["rope_type"] == "su":  # LongRoPE's first name in Phi-3 configs
        rope["rope_type"] = "longrope"
    # GPT-NeoX's configs before transformers 5: rotary_emb_base, rotary_pct
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or cfg.get("rotary_emb_base") or 10000.0
    partial = rope.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor") or cfg.get("rotary_pct") \
        or 1.0
    if rope["rope_type"] == "longrope":
        rope.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    bias = bool(cfg.get("attention_bias", arch == "gpt_neox"))
    eps = cfg.get("layer_norm_eps", 1e-5) if arch in LAYER_NORMED else cfg.get("rms_norm_eps", 1e-6)
    window = cfg.get("sliding_window") if arch in ("mistral", "phi3", "gemma2") else None
    layers = _int(_require(cfg, "num_hidden_layers", source), "num_hidden_layers", source)
    sliding_layers = None
    if arch == "gemma2":  # transformers 5 lists layer_types; before, even layers slid
        types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                           for i in range(layers)]
        sliding_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return ModelConfig(
        architecture=arch,
        vocab_size=_int(_require(cfg, "vocab_size", source), "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_int(_require(cfg, "intermediate_size", source), "intermediate_size", source),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_int(cfg.get("num_key_value_heads") or heads, "num_key_value_heads", source),
        head_dim=_head_dim(cfg.get("head_dim"), hidden, heads, "head_dim", source),
        rms_norm_eps=float(eps),
        rope_theta=float(theta),
        max_position_embeddings=_int(cfg.get("max_position_embeddings", 2048), "max_position_embeddings", source),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bias or bool(arch == "stablelm" and cfg.get("use_qkv_bias")),
        o_bias=bias and arch in ("llama", "qwen3", "gpt_neox"),
        qk_norm=arch == "qwen3",
        partial_rotary_factor=float(partial),
        mlp_gate=GATED_ACTIVATIONS[act],
        scale_embeddings=arch in GEMMAS,
        sandwich_norms=arch == "gemma2",
        attn_softcap=cfg.get("attn_logit_softcapping") if arch == "gemma2" else None,
        final_softcap=cfg.get("final_logit_softcapping") if arch == "gemma2" else None,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if arch == "gemma2" else None,
        sliding_layers=sliding_layers,
        norm="layer_norm" if arch in LAYER_NORMED else "rms_norm",
        parallel_residual=arch == "cohere" or bool(arch in ("gpt_neox", "stablelm")
                                                   and cfg.get("use_parallel_residual", arch == "gpt_neox")),
        norm_bias=arch != "cohere",
        logit_scale=cfg.get("logit_scale") if arch == "cohere" else None,
        interleaved_rope=arch == "cohere",
        qk_layer_norm=bool(arch == "cohere" and cfg.get("use_qk_norm")),
        sliding_window=_int(window, "sliding_window", source) if window is not None else None,
        rope_scaling=rope,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id"), source),
    )


def config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
    try:
        return _config_from_gguf(meta, tensor_names, source)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{source}: invalid GGUF metadata ({type(e).__name__}: {e})") from None


def _config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    family = GGUF_FAMILY.get(arch, arch)

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{source}: missing GGUF key {arch}.{name}")
        return value

    def size(name: str, default: Any = None) -> int:
        return _int(key(name, default), f"{arch}.{name}", source)

    hidden = size("embedding_length")
    heads = size("attention.head_count")
    rope: dict[str, Any] = {"rope_type": "default"}
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"{source}: unsupported rope scaling {scaling!r}")
    if "rope_freqs.weight" in tensor_names:  # llama.cpp's form of Llama-3 rope scaling
        rope = {"rope_type": "freq_factors"}
    if "rope_factors_long.weight" in tensor_names:  # Phi-3's LongRoPE: the factors are tensors (the loader's)
        rope = {"rope_type": "longrope",
                "original_max_position_embeddings": size("rope.scaling.original_context_length"),
                "attention_factor": meta.get(f"{arch}.rope.scaling.attn_factor")}
    head_dim = _head_dim(meta.get(f"{arch}.attention.key_length"), hidden, heads, f"{arch}.attention.key_length",
                         source)
    rotary = meta.get(f"{arch}.rope.dimension_count")
    window = meta.get(f"{arch}.attention.sliding_window")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    return ModelConfig(
        architecture=family,
        vocab_size=_int(vocab, f"{arch}.vocab_size", source),
        hidden_size=hidden,
        intermediate_size=size("feed_forward_length"),
        num_layers=size("block_count"),
        num_heads=heads,
        num_kv_heads=size("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_epsilon" if family in LAYER_NORMED
                               else "attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        max_position_embeddings=size("context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names or "blk.0.attn_qkv.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm=family != "cohere" and "blk.0.attn_q_norm.weight" in tensor_names,
        qk_layer_norm=family == "cohere" and "blk.0.attn_q_norm.weight" in tensor_names,
        partial_rotary_factor=_int(rotary, f"{arch}.rope.dimension_count", source) / head_dim if rotary else 1.0,
        sliding_window=_int(window, f"{arch}.attention.sliding_window", source) if window else None,
        mlp_gate="gelu_tanh_mul" if arch in GEMMAS else "silu_mul",
        norm="layer_norm" if family in LAYER_NORMED else "rms_norm",
        # llama.cpp: GPT-NeoX says so in a key; a StableLM without ffn_norm tensors is parallel
        parallel_residual=family == "cohere" or (family == "stablelm" and "blk.0.ffn_norm.weight" not in tensor_names)
        or bool(family == "gpt_neox" and meta.get(f"{arch}.use_parallel_residual", True)),
        norm_bias=family != "cohere",
        logit_scale=meta.get(f"{arch}.logit_scale") if family == "cohere" else None,
        interleaved_rope=family == "cohere",
        scale_embeddings=arch in GEMMAS,
        **(_gemma2_gguf(meta, arch, hidden, heads, head_dim, size("block_count")) if arch == "gemma2" else {}),
        rope_scaling=rope,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(meta.get("tokenizer.ggml.eos_token_id"), source),
    )


def _gemma2_gguf(meta: Mapping[str, Any], arch: str, hidden: int, heads: int, head_dim: int,
                 layers: int) -> dict[str, Any]:
    """Gemma 2's options as llama.cpp stores (or implies) them: every other layer slides
    from the first; llama.cpp scales queries by head_dim ** -0.5 except in the 27B model
    (46 layers), whose query_pre_attn_scalar is hidden / heads."""
    return dict(sandwich_norms=True, attn_softcap=meta.get(f"{arch}.attn_logit_softcapping"),
                final_softcap=meta.get(f"{arch}.final_logit_softcapping"),
                query_pre_attn_scalar=float(hidden // heads if layers == 46 else head_dim),
                sliding_layers=tuple(range(0, layers, 2)))
