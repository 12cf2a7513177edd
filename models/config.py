"""Model configuration, read from an HF config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from fusec.errors import ModelLoadError, UnsupportedModelError

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2": one graph builder serves all three
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    # rope_type plus its parameters, in HF's naming ("default", "linear", "llama3").
    rope_scaling: Mapping[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim={self.head_dim} must be even for rotary embeddings")

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


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


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
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: unsupported hidden_act {cfg['hidden_act']!r}")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias is not supported")
    if arch == "qwen2" and cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: Qwen2 use_sliding_window is not supported")
    hidden = int(_require(cfg, "hidden_size", source))
    heads = int(_require(cfg, "num_attention_heads", source))
    # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(_require(cfg, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", source)),
        num_layers=int(_require(cfg, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bias,
        o_bias=bias and arch == "llama",
        sliding_window=cfg.get("sliding_window") if arch == "mistral" else None,
        rope_scaling=rope,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
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

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{source}: missing GGUF key {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    rope: dict[str, Any] = {"rope_type": "default"}
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"{source}: unsupported rope scaling {scaling!r}")
    if "rope_freqs.weight" in tensor_names:  # llama.cpp's form of Llama-3 rope scaling
        rope = {"rope_type": "freq_factors"}
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        rope_scaling=rope,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(meta.get("tokenizer.ggml.eos_token_id")),
    )
