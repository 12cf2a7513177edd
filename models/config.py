"""Model configuration, read from an HF config.json or GGUF metadata."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

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
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "stablelm", "gptneox", "command-r",
                      "qwen2moe", "qwen3moe")
# llama.cpp's names that differ from fusec's (a "llama" with experts is Mixtral)
GGUF_FAMILY = {"gptneox": "gpt_neox", "command-r": "cohere", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
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
class MoeConfig:
    """A sparse MLP: a router picks top_k of `experts` SiLU-gated experts per token."""

    experts: int  # routed experts
    top_k: int
    intermediate_size: int  # each expert's
    layers: tuple[int, ...]  # the layers whose MLP is sparse (the others are dense, intermediate_size wide)
    # a shared expert as `shared` parts of intermediate_size each, always on (Qwen2-MoE,
    # DeepSeek); weight 1, or sigmoid of a gate row (Qwen2-MoE's shared_expert_gate)
    shared: int = 0
    shared_gate: bool = False
    renormalize: bool = False  # the top-k weights renormalized to sum 1 (Mixtral, norm_topk_prob)
    scaling: float = 1.0  # routed_scaling_factor (DeepSeek)
    n_group: int = 1  # DeepSeek's group-limited greedy: top_k among the topk_group best of n_group groups
    topk_group: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.experts <= 4096:
            raise ModelLoadError(f"config: {self.top_k} experts per token of {self.experts} routed experts")
        if self.n_group < 1 or self.experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ModelLoadError(f"config: n_group={self.n_group}, topk_group={self.topk_group} do not divide "
                                 f"{self.experts} experts")
        if self.top_k > self.topk_group * (self.experts // self.n_group):
            raise ModelLoadError(f"config: top-{self.top_k} of {self.topk_group} groups of "
                                 f"{self.experts // self.n_group} experts")

    @property
    def slots(self) -> int:
        """Experts each token runs: its top_k and the shared parts."""
        return self.top_k + self.shared


@dataclass(frozen=True)
class MlaConfig:
    """DeepSeek-V2's multi-head latent attention: keys and values come from a latent of
    kv_lora_rank dims per token (what the cache holds, beside a rope key shared by the
    heads); queries from x directly or through a q_lora_rank latent."""

    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float  # (nope + rope dims) ** -0.5, times YaRN's mscale squared


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
    moe: MoeConfig | None = None  # sparse MLPs (Mixtral, Qwen-MoE, DeepSeek-V2)
    mla: MlaConfig | None = None  # latent attention (DeepSeek-V2)

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
    if arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and cfg.get("use_sliding_window"):
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
    bias = bool(cfg.get("attention_bias", arch in ("gpt_neox", "qwen2_moe")))
    eps = cfg.get("layer_norm_eps", 1e-5) if arch in LAYER_NORMED else cfg.get("rms_norm_eps", 1e-6)
    window = cfg.get("sliding_window") if arch in ("mistral", "phi3", "gemma2", "mixtral") else None
    layers = _int(_require(cfg, "num_hidden_layers", source), "num_hidden_layers", source)
    moe = _moe_from_hf(cfg, arch, layers, source)
    mla = _mla_from_hf(cfg, rope, source) if arch == "deepseek_v2" else None
    head_dim = _head_dim(cfg.get("head_dim"), hidden, heads, "head_dim", source)
    if mla is not None:  # RoPE turns each head's rope part only
        head_dim = mla.qk_rope_head_dim
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
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        rope_theta=float(theta),
        max_position_embeddings=_int(cfg.get("max_position_embeddings", 2048), "max_position_embeddings", source),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch in ("qwen2", "qwen2_moe") or bias or bool(arch == "stablelm" and cfg.get("use_qkv_bias")),
        o_bias=bias and arch in ("llama", "qwen3", "gpt_neox"),
        qk_norm=arch in ("qwen3", "qwen3_moe"),
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
        interleaved_rope=arch in ("cohere", "deepseek_v2"),
        qk_layer_norm=bool(arch == "cohere" and cfg.get("use_qk_norm")),
        moe=moe,
        mla=mla,
        sliding_window=_int(window, "sliding_window", source) if window is not None else None,
        rope_scaling=rope,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id"), source),
    )


# transformers >= 5 writes num_local_experts for every family's routed-expert count
EXPERT_ALIASES = {"num_experts": "num_local_experts", "n_routed_experts": "num_local_experts"}


def _moe_from_hf(cfg: Mapping[str, Any], arch: str, layers: int, source: str) -> MoeConfig | None:
    """The sparse MLPs of Mixtral, Qwen2/3-MoE and DeepSeek-V2, as each config names them."""
    def size(key: str, default: Any = None) -> int:
        value = cfg.get(key, cfg.get(EXPERT_ALIASES.get(key, ""), default))
        if value is None:
            raise ModelLoadError(f"{source}: missing {key!r}")
        return _int(value, key, source)

    if arch == "mixtral":
        return MoeConfig(experts=size("num_local_experts"), top_k=size("num_experts_per_tok"),
                         intermediate_size=size("intermediate_size"), layers=tuple(range(layers)), renormalize=True)
    if arch in ("qwen2_moe", "qwen3_moe"):
        step, dense = size("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
        experts = size("num_experts")
        sparse = tuple(i for i in range(layers) if experts and i not in dense and (i + 1) % step == 0)
        inter = size("moe_intermediate_size")
        shared_size = size("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0
        if shared_size % inter:
            raise UnsupportedModelError(f"{source}: shared_expert_intermediate_size {shared_size} is not a multiple "
                                        f"of moe_intermediate_size {inter}")
        return MoeConfig(experts=experts, top_k=size("num_experts_per_tok"), intermediate_size=inter,
                         layers=sparse, shared=shared_size // inter, shared_gate=shared_size > 0,
                         renormalize=bool(cfg.get("norm_topk_prob", arch == "qwen3_moe"))) if sparse else None
    if arch == "deepseek_v2":
        method = cfg.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(f"{source}: unsupported topk_method {method!r}; supported: greedy, "
                                        f"group_limited_greedy")
        if cfg.get("scoring_func", "softmax") != "softmax":
            raise UnsupportedModelError(f"{source}: unsupported scoring_func {cfg.get('scoring_func')!r}")
        experts = size("n_routed_experts", 0)
        first, freq = size("first_k_dense_replace", 0), size("moe_layer_freq", 1)
        sparse = tuple(i for i in range(layers) if experts and i >= first and i % freq == 0)
        grouped = method == "group_limited_greedy"
        return MoeConfig(experts=experts, top_k=size("num_experts_per_tok"),
                         intermediate_size=size("moe_intermediate_size"), layers=sparse,
                         shared=size("n_shared_experts", 0), renormalize=bool(cfg.get("norm_topk_prob")),
                         scaling=float(cfg.get("routed_scaling_factor") or 1.0),
                         n_group=size("n_group") if grouped else 1,
                         topk_group=size("topk_group") if grouped else 1) if sparse else None
    return None


def _mla_from_hf(cfg: Mapping[str, Any], rope: Mapping[str, Any], source: str) -> MlaConfig:
    def size(key: str) -> int:
        return _int(_require(cfg, key, source), key, source)

    nope, rot = size("qk_nope_head_dim"), size("qk_rope_head_dim")
    scale = (nope + rot) ** -0.5
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        mscale = yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"]))
        scale *= mscale * mscale
    q_lora = cfg.get("q_lora_rank")
    return MlaConfig(kv_lora_rank=size("kv_lora_rank"), q_lora_rank=None if q_lora is None else size("q_lora_rank"),
                     qk_nope_head_dim=nope, qk_rope_head_dim=rot, v_head_dim=size("v_head_dim"),
                     softmax_scale=scale)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched by `factor`."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


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
    if meta.get(f"{arch}.expert_count"):
        family = "mixtral" if family == "llama" else family
        gating = meta.get(f"{arch}.expert_gating_func")
        if gating not in (None, 1):  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
            raise UnsupportedModelError(f"{source}: unsupported expert gating function {gating!r}; supported: "
                                        f"softmax (1)")

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
    layers = size("block_count")
    moe = _moe_from_gguf(meta, arch, family, tensor_names, layers, size, source) \
        if family in ("mixtral", "qwen2_moe", "qwen3_moe") else None
    return ModelConfig(
        architecture=family,
        vocab_size=_int(vocab, f"{arch}.vocab_size", source),
        hidden_size=hidden,
        intermediate_size=size("feed_forward_length", moe.intermediate_size if moe else None),
        num_layers=layers,
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
        **(_gemma2_gguf(meta, arch, hidden, heads, head_dim, layers) if arch == "gemma2" else {}),
        moe=moe,
        rope_scaling=rope,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(meta.get("tokenizer.ggml.eos_token_id"), source),
    )


def _moe_from_gguf(meta: Mapping[str, Any], arch: str, family: str, tensor_names: set[str], layers: int,
                   size: Callable[..., int], source: str) -> MoeConfig | None:
    """Mixtral's, Qwen2-MoE's and Qwen3-MoE's sparse MLPs as llama.cpp stores them: the
    sparse layers are those with a router (ffn_gate_inp); Mixtral's experts are
    feed_forward_length wide; the top-k weights renormalized as llama.cpp's graphs do
    (Mixtral, Qwen3-MoE) unless expert_weights_norm says otherwise."""
    inter = size("expert_feed_forward_length", size("feed_forward_length") if family == "mixtral" else None)
    shared_size = size("expert_shared_feed_forward_length", 0) if family == "qwen2_moe" else 0
    if shared_size % inter:
        raise UnsupportedModelError(f"{source}: shared expert width {shared_size} is not a multiple of the experts' "
                                    f"{inter}")
    sparse = tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in tensor_names)
    if not sparse:
        return None
    renormalize = meta.get(f"{arch}.expert_weights_norm", family != "qwen2_moe")
    return MoeConfig(experts=size("expert_count"), top_k=size("expert_used_count"), intermediate_size=inter,
                     layers=sparse, shared=shared_size // inter,
                     shared_gate=f"blk.{sparse[0]}.ffn_gate_inp_shexp.weight" in tensor_names,
                     renormalize=bool(renormalize), scaling=float(meta.get(f"{arch}.expert_weights_scale") or 1.0))


def _gemma2_gguf(meta: Mapping[str, Any], arch: str, hidden: int, heads: int, head_dim: int,
                 layers: int) -> dict[str, Any]:
    """Gemma 2's options as llama.cpp stores (or implies) them: every other layer slides
    from the first; llama.cpp scales queries by head_dim ** -0.5 except in the 27B model
    (46 layers), whose query_pre_attn_scalar is hidden / heads."""
    return dict(sandwich_norms=True, attn_softcap=meta.get(f"{arch}.attn_logit_softcapping"),
                final_softcap=meta.get(f"{arch}.final_logit_softcapping"),
                query_pre_attn_scalar=float(hidden // heads if layers == 46 else head_dim),
                sliding_layers=tuple(range(0, layers, 2)))
