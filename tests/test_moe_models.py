"""Mixture-of-experts models beyond the greedy-token checks of test_model_families:
decode reads only the experts the router picked, MLA's cache holds the latent, online
quantization runs through the expert kernels, and what is not supported says so."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from fusec.errors import UnsupportedModelError
from fusec.fusion.codegen.target import HOST
from fusec.fusion.plan import PlanOptions, has_int8_dots
from fusec.fusion.traffic import weight_traffic
from fusec.kernels.quant import FORMATS
from fusec.kernels.registry import default_registry
from fusec.kernels.testing import random_blocks
from fusec.models.loader import load_model
from fusec.runtime.backends.cpu import HostDevice
from fusec.runtime.executor import PlanExecutor
from fusec.runtime.model_runner import SequenceChunk, build_inputs
from fusec.runtime.sequence import SamplingParams
from helpers import engine_generate

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2_lite", "deepseek_v2"]
BLOCK = 8


def _executor(model, graph, weights, device) -> PlanExecutor:
    ex = PlanExecutor(device, graph, weights, default_registry(), PlanOptions(HOST, 128), poison=True)
    ex.allocate_kv(12)
    return ex


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v2_lite", "deepseek_v2"])
def test_decode_reads_only_routed_experts(tiny_checkpoints, name):
    """A decode step of 3 sequences (the fused GEMV plan) reads, per sparse layer, only
    the experts the router picked: the plan's accounting from the router's output
    counts exactly those, and with every other expert's weights NaN the logits are
    bit-identical (a kernel that touched one would turn them NaN)."""
    model = load_model(str(tiny_checkpoints[name]))
    graph = model.graph(BLOCK)
    routes = [n.name for n in graph.nodes() if n.kind == "moe_route"]
    assert routes
    graph = graph.with_outputs(*graph.outputs, *routes)
    device = HostDevice()
    ex = _executor(model, graph, model.weights, device)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (5, 11, 7)]
    tables = [[0, 1], [2, 3], [4, 5]]
    ex.run(build_inputs([SequenceChunk(p, 0, t) for p, t in zip(prompts, tables)], BLOCK))  # prefill
    step = build_inputs([SequenceChunk([int(rng.integers(model.config.vocab_size))], len(p), t)
                         for p, t in zip(prompts, tables)], BLOCK)
    assert ex.plan_for(3).bucket == "gemv"
    kv = {k: v.copy() for k, v in ex.kv.items()}
    out = {k: device.to_host(v) for k, v in ex.run(step).items()}
    chosen = {r: out[r] for r in routes}

    sizes = model.weight_bytes()
    traffic = weight_traffic(ex.plans["gemv"], sizes, 3, chosen)
    poisoned = dict(model.weights)
    unread = 0
    for r in routes:
        node = graph.node(r)
        slots = node.attrs["top_k"] + node.attrs["shared"]
        used = {e for e in np.unique(chosen[r][:, :slots].astype(int)) if e < node.attrs["experts"]}  # routed
        assert len(used) < node.attrs["experts"], "the test needs an expert nobody picked"
        layer = r.rsplit(".", 1)[0]
        for part in ("experts_gate_up", "experts_down"):
            w = np.array(model.weights[f"{layer}.{part}"], np.float32)
            per = w.shape[0] // (node.attrs["experts"] + node.attrs["shared"])
            for e in set(range(node.attrs["experts"])) - used:
                w[e * per:(e + 1) * per] = np.nan
                unread += per * w.shape[1] * w.itemsize
            poisoned[f"{layer}.{part}"] = w
    # the accounting: every weight, less the unpicked experts and the embedding rows no token looked up
    # (tied embeddings: the LM head reads the whole table too)
    table = sizes["embed_tokens"]
    rows = table // model.config.vocab_size * 3
    assert traffic.read == traffic.total - unread - table + rows + (table if model.config.tie_word_embeddings else 0)

    ex2 = _executor(model, graph, poisoned, device)
    for k, v in kv.items():
        np.copyto(ex2.kv[k], v)
    again = {k: device.to_host(v) for k, v in ex2.run(step).items()}
    assert np.isfinite(again["logits"]).all()
    np.testing.assert_array_equal(again["logits"], out["logits"])
    for r in routes:
        np.testing.assert_array_equal(again[r], chosen[r])


def test_mla_cache_holds_the_latent(tiny_checkpoints):
    """DeepSeek-V2's paged cache holds per token the latent and the shared rope key
    (kv_lora_rank + qk_rope_head_dim values a layer), not per-head keys and values."""
    from fusec.runtime.executor import kv_bytes_per_block

    model = load_model(str(tiny_checkpoints["deepseek_v2_lite"]))
    cfg, mla = model.config, model.config.mla
    per_token = cfg.num_layers * (mla.kv_lora_rank + mla.qk_rope_head_dim) * 4
    assert kv_bytes_per_block(model.graph(BLOCK)) == per_token * BLOCK
    full = cfg.num_layers * cfg.num_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim) * 4
    assert per_token < full / 2


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v2_lite"])
def test_online_q8_0_runs_the_experts_in_blocks(tiny_checkpoints, name):
    """--quantization q8_0 quantizes the experts (not the router) at load; the fused
    plans over the blocks give the reference interpreter's greedy tokens on the same
    quantized weights."""
    model = load_model(str(tiny_checkpoints[name]), quantization="q8_0")
    assert any(k.endswith("experts_gate_up") for k in model.formats)
    assert not any(k.endswith("router") for k in model.formats)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (4, 12)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert engine_generate(model, prompts, params, "fused") == engine_generate(model, prompts, params, "reference")


def write_quantized_qwen2_moe_gguf(path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A tiny Qwen2-MoE as llama.cpp stores one, its experts in K-quants: expert stacks
    [E, N, K] (gate and up in q4_k, down in q8_0: its K = 128 is no K-quant's), a shared
    expert of two experts' width (its down in q8_0 in layer 0, whose 128-column cuts keep
    whole blocks, and q6_k in layer 1, whose cuts would split blocks), f32 routers and
    the shared gate as a vector; attention and the output matrix in q8_0 (gguf's
    quantizer gives zero-mean rows: random K-quant rows have random means, which would
    make every token's hidden state alike). Random blocks; returns each quantized
    tensor's bytes."""
    hidden, heads, kv_heads, head_dim, vocab, layers = 256, 4, 2, 64, 160, 2
    experts, inter, shared = 4, 128, 256
    q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(512)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_expert_count(experts)
    w.add_expert_used_count(2)
    w.add_expert_feed_forward_length(inter)
    w.add_expert_shared_feed_forward_length(shared)
    # an output matrix of its own: a random tied one maps each token to itself
    shapes = {"token_embd.weight": ((vocab, hidden), q.Q4_K), "output.weight": ((vocab, hidden), q.Q8_0),
              "output_norm.weight": ((hidden,), None)}
    for i in range(layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": ((hidden,), None), p + "ffn_norm.weight": ((hidden,), None),
                   p + "attn_q.weight": ((heads * head_dim, hidden), q.Q8_0),
                   p + "attn_k.weight": ((kv_heads * head_dim, hidden), q.Q8_0),
                   p + "attn_v.weight": ((kv_heads * head_dim, hidden), q.Q8_0),
                   p + "attn_q.bias": ((heads * head_dim,), None), p + "attn_k.bias": ((kv_heads * head_dim,), None),
                   p + "attn_v.bias": ((kv_heads * head_dim,), None),
                   p + "attn_output.weight": ((hidden, heads * head_dim), q.Q8_0),
                   p + "ffn_gate_inp.weight": ((experts, hidden), None),
                   p + "ffn_gate_inp_shexp.weight": ((hidden,), None),
                   p + "ffn_gate_exps.weight": ((experts, inter, hidden), q.Q4_K),
                   p + "ffn_up_exps.weight": ((experts, inter, hidden), q.Q4_K),
                   p + "ffn_down_exps.weight": ((experts, hidden, inter), q.Q8_0),
                   p + "ffn_gate_shexp.weight": ((shared, hidden), q.Q4_K),
                   p + "ffn_up_shexp.weight": ((shared, hidden), q.Q4_K),
                   p + "ffn_down_shexp.weight": ((hidden, shared), (q.Q8_0, q.Q6_K)[i])}
    raw = {}
    for name, (shape, qtype) in shapes.items():
        if qtype is None:
            scale = 1.0 if "gate_inp" in name else 0.2
            w.add_tensor(name, ((not name.endswith("bias") and "gate_inp" not in name)
                                + scale * rng.standard_normal(shape)).astype(np.float32))
            continue
        std = 0.05 if name.startswith("token_embd") else 1 / np.sqrt(shape[-1])
        rows = int(np.prod(shape[:-1]))
        raw[name] = random_blocks(rng, rows, shape[-1], FORMATS[qtype.name.lower()], std).reshape(*shape[:-1], -1)
        w.add_tensor(name, raw[name], raw_shape=raw[name].shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


def test_quantized_moe_gguf_runs_its_experts_in_blocks(tmp_path):
    """llama.cpp's expert stacks run in their stored blocks: gate | up interleaved expert
    by expert as bytes, down as stored, a shared expert's down cut by columns on block
    boundaries (bytes, no re-quantization), or re-quantized to q8_0 where a cut would
    split blocks; the fused plans give the reference interpreter's greedy tokens on
    the same weights."""
    raw = write_quantized_qwen2_moe_gguf(tmp_path / "m.gguf", np.random.default_rng(7))
    model = load_model(str(tmp_path / "m.gguf"))
    cfg = model.config
    assert cfg.architecture == "qwen2_moe" and cfg.moe.shared == 2 and cfg.moe.shared_gate
    assert cfg.moe.layers == (0, 1) and not cfg.moe.renormalize
    for i in range(2):
        assert model.formats[f"layers.{i}.experts_gate_up"] == "q4_k"
        assert model.formats[f"layers.{i}.experts_down"] == "q8_0"
        assert f"layers.{i}.router" not in model.formats
    gate, up = raw["blk.0.ffn_gate_exps.weight"], raw["blk.0.ffn_up_exps.weight"]
    gate_sh, up_sh = raw["blk.0.ffn_gate_shexp.weight"], raw["blk.0.ffn_up_shexp.weight"]
    want = np.concatenate([np.concatenate([gate, up], axis=1).reshape(-1, gate.shape[-1]),
                           gate_sh[:128], up_sh[:128], gate_sh[128:], up_sh[128:]])
    np.testing.assert_array_equal(model.weights["layers.0.experts_gate_up"], want)
    down, down_sh = raw["blk.0.ffn_down_exps.weight"], raw["blk.0.ffn_down_shexp.weight"]
    half = down_sh.shape[1] // 2  # 128 columns: 4 blocks of 34 bytes
    want = np.concatenate([down.reshape(-1, down.shape[-1]), down_sh[:, :half], down_sh[:, half:]])
    np.testing.assert_array_equal(model.weights["layers.0.experts_down"], want)
    router = model.weights["layers.0.router"]
    assert router.shape == (5, 256) and np.isfinite(router).all()
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 13, 9)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = engine_generate(model, prompts, params, "reference")
    assert engine_generate(model, prompts, params, "fused") == ref
    assert len({t for seq in ref for t in seq}) > 3
    if has_int8_dots(HOST):  # int8 dots: q8_0 / q4 matrices banded, the expert stacks' too (by expert)
        banded = load_model(str(tmp_path / "m.gguf"), int8_bands=True)
        assert (banded.formats["layers.0.experts_down"], banded.formats["layers.0.experts_gate_up"]) == \
            ("q8_0x16", "q4_k")
        got = engine_generate(banded, prompts, params, "fused", int8_activations=True)
        assert [len(seq) for seq in got] == [16] * len(prompts)


def test_unsupported_moe_variants_are_refused(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["deepseek_v2"]
    bad = tmp_path / "v3"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["topk_method"] = "noaux_tc"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="topk_method 'noaux_tc'"):
        load_model(str(bad))
    for arch, gating, message in (("qwen3moe", 2, "unsupported expert gating function 2"),
                                  ("deepseek2", None, "unsupported GGUF architecture 'deepseek2'")):
        path = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        w.add_block_count(1)
        w.add_expert_count(8)
        if gating is not None:
            w.add_uint32(f"{arch}.expert_gating_func", gating)
        w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(UnsupportedModelError, match=message):
            load_model(str(path))
