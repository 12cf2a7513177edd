"""Which graph builder serves each architecture: GPT-NeoX and DeepSeek-V2 (latent
attention) have their own layer shapes; every other family is the Llama layer with
options (models/llama.py)."""
from __future__ import annotations

from types import ModuleType

from fusec.models import deepseek_v2, gpt_neox, llama
from fusec.models.config import ModelConfig

BUILDERS: dict[str, ModuleType] = {"gpt_neox": gpt_neox, "deepseek_v2": deepseek_v2}


def builder(cfg: ModelConfig) -> ModuleType:
    """The module with `weight_shapes(cfg)` and `build_graph(cfg, ...)` for this config."""
    return BUILDERS.get(cfg.architecture, llama)


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return builder(cfg).weight_shapes(cfg)
