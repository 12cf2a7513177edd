"""The sparse MLP block of mixture-of-experts models (Mixtral, Qwen2/3-MoE, DeepSeek-V2).

A router picks each token's top-k experts; each runs a SiLU-gated MLP on the token and
the outputs are summed with the router's weights. A shared expert (Qwen2-MoE, DeepSeek)
is stored as `shared` more experts of the routed ones' size, which every token runs (its
gate | up rows and down columns cut into equal parts: the sum over the parts is the
shared MLP), so one routed-expert kernel serves both. Expert matrices are stacked:
experts_gate_up[(E + shared) * 2I, H] ([gate | up] per expert), experts_down[(E + shared) * H, I].
"""
from __future__ import annotations

from typing import Mapping

from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Graph
from fusec.models.config import ModelConfig

T = "T"


def weight_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """The sparse MLP's weights of one layer (`prefix` "layers.{i}.")."""
    moe = cfg.moe
    assert moe is not None
    h, inter, total = cfg.hidden_size, moe.intermediate_size, moe.experts + moe.shared
    return {prefix + "router": (moe.experts + int(moe.shared_gate), h),
            prefix + "experts_gate_up": (total * 2 * inter, h),
            prefix + "experts_down": (total * h, inter)}


def is_sparse(cfg: ModelConfig, layer: int) -> bool:
    return cfg.moe is not None and layer in cfg.moe.layers


def sparse_mlp(g: Graph, cfg: ModelConfig, dtype: DType, w: Mapping[str, str], x: str, layer: int) -> str:
    """Layer `layer`'s sparse MLP of the normed input x: [T, hidden]."""
    moe = cfg.moe
    assert moe is not None
    p, slots, total = f"layers.{layer}.", moe.slots, moe.experts + moe.shared
    route = g.op("moe_route", [x, w[p + "router"]], (T, 2 * slots), DType.F32, name=p + "route", layer=layer,
                 experts=moe.experts, top_k=moe.top_k, shared=moe.shared, shared_gate=moe.shared_gate,
                 renormalize=moe.renormalize, scaling=moe.scaling, n_group=moe.n_group, topk_group=moe.topk_group)
    inter = moe.intermediate_size
    gu = g.op("moe_matmul", [x, route, w[p + "experts_gate_up"]], (T, slots * 2 * inter), dtype,
              name=p + "experts_gate_up.out", layer=layer, experts=total, slots=slots, combine=False)
    act = g.op(cfg.mlp_gate, [gu], (T, slots * inter), dtype, name=p + "experts_act", layer=layer, groups=slots)
    return g.op("moe_matmul", [act, route, w[p + "experts_down"]], (T, cfg.hidden_size), dtype,
                name=p + "experts_down.out", layer=layer, experts=total, slots=slots, combine=True)
