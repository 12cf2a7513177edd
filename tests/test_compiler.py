"""The compiler end to end: plans for real models, fused generation equal to the
reference, `fusec compile` and its cache."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_SPECS
from helpers import engine_generate
from fusec.fusion import compiler
from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import HOST, parse_arch
from fusec.fusion.explain import layer_summary
from fusec.fusion.patterns import Pattern, PNode
from fusec.fusion.plan import PlanOptions, build_plans
from fusec.kernels.registry import default_registry, lower_gemv
from fusec.kernels.sampling import SampleRows
from fusec.models.loader import load_model
from fusec.runtime.sequence import SamplingParams

FUSEC = str(Path(sys.executable).with_name("fusec"))
MODELS = ["smollm2"] + [s.name for s in TINY_SPECS]


def model_path(name, tiny_checkpoints, smollm2_path) -> str:
    return str(smollm2_path if name == "smollm2" else tiny_checkpoints[name])


def launch_budget(cfg, layer: int) -> int:
    """A decode layer's launches: the Llama family's 6 (attention: QKV GEMV, RoPE + KV
    write, attention, O GEMV; MLP: gate|up and down GEMVs, each with its prologue); one
    more for a parallel residual's sum; MLA 6 for attention (the absorbed query and value
    up-projections are a GEMV each) and 3 more with a query latent (its norm, its GEMV,
    RoPE of its rope part); a sparse MLP 3 (router with the residual add and norm, the
    experts' gate|up, their down with SiLU·mul and the weighted sum)."""
    attention = 4 if cfg.mla is None else 6 if cfg.mla.q_lora_rank is None else 9
    mlp = 3 if cfg.moe is not None and layer in cfg.moe.layers else 2
    return attention + mlp + cfg.parallel_residual


@pytest.mark.parametrize("arch", ["sm_90", "host"])
@pytest.mark.parametrize("name", MODELS)
def test_decode_plan_launches_per_layer(name, arch, tiny_checkpoints, smollm2_path):
    m = load_model(model_path(name, tiny_checkpoints, smollm2_path), with_weights=False)
    plans = build_plans(m.graph(16), default_registry(), PlanOptions(parse_arch(arch), 512))
    summary = layer_summary(plans["gemv"])
    layers = [(layer, n_ops, pats) for layer, n_ops, pats in summary if layer is not None]
    assert len(layers) == m.config.num_layers
    for layer, n_ops, patterns in layers:
        assert len(patterns) <= launch_budget(m.config, layer), (layer, patterns)
        assert n_ops >= 14
        if m.config.mla is None:
            assert any(p.endswith("rope_kv_write") for p in patterns) and "paged_attention" in patterns
        else:
            assert any(p.startswith("latent_") for p in patterns) and "mla_paged_attention" in patterns
        if m.config.moe is not None and layer in m.config.moe.layers:
            assert patterns[-2:] == ["moe_gemv", "silu_mul_moe_gemv"] and "add_rms_norm_moe_route" in patterns
    # no op falls back to the reference, in either plan
    for plan in plans.values():
        assert not [launch for launch in plan.launches if launch.kind == "reference"]


def test_buffer_planning_reuses_slots_without_overlap(smollm2_path):
    m = load_model(str(smollm2_path), with_weights=False)
    for plan in build_plans(m.graph(16), default_registry(), PlanOptions(HOST, 512)).values():
        assert plan.num_slots <= 6  # 30 layers of intermediates in a handful of buffers
        born, last = {}, {}
        for i, launch in enumerate(plan.launches):
            for v in launch.inputs:
                last[plan.resolve(v)] = i
            for v in launch.outputs:
                born.setdefault(plan.resolve(v), i)
        for out in plan.graph.outputs:
            last[plan.resolve(out)] = len(plan.launches)
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for value, slot in plan.slots.items():
            by_slot.setdefault(slot, []).append((born[value], last.get(value, born[value])))
        for spans in by_slot.values():
            spans.sort()
            for (_, end), (start, _) in zip(spans, spans[1:]):
                assert end < start, "two live values share a buffer"


def test_illegal_pattern_is_rejected():
    registry = default_registry()
    norm_after_gemv = Pattern("gemv_rms_norm", 99, (PNode("matmul", "matmul"), PNode("norm", "rms_norm", (("matmul", 0),))),
                              lower_gemv)
    with pytest.raises(ValueError, match="kernel boundary"):
        registry.register(norm_after_gemv)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fused_generation_equals_reference(name, tiny_checkpoints, smollm2_path):
    m = load_model(model_path(name, tiny_checkpoints, smollm2_path))
    rng = np.random.default_rng(5)
    if m.tokenizer is not None:
        prompts = [m.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
                   m.tokenizer.encode("The quick brown fox"), m.tokenizer.encode("1, 2, 3,")]
    else:
        prompts = [rng.integers(0, m.config.vocab_size, n).tolist() for n in (13, 4, 9)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = engine_generate(m, prompts, params, "reference")
    fused = engine_generate(m, prompts, params, "fused")
    assert fused == ref
    assert len(set(map(tuple, ref))) > 1


@pytest.mark.slow
def test_cli_generate_fused_equals_reference():
    args = [FUSEC, "generate", "--chat", "--prompt", "What is the capital of France?", "--prompt", "Name a color.",
            "--max-tokens", "24"]
    ref = subprocess.run(args + ["--executor", "reference"], capture_output=True, text=True, timeout=300)
    fused = subprocess.run(args + ["--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0 and fused.returncode == 0, fused.stderr
    assert fused.stdout == ref.stdout and "Paris" in fused.stdout


def run_compile(cache_dir: Path, *extra: str) -> tuple[str, float, dict[str, int]]:
    env = dict(os.environ, FUSEC_CACHE_DIR=str(cache_dir))
    res = subprocess.run([FUSEC, "compile", "--arch", "sm_90", *extra], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    counts = re.search(r"kernels: (\d+) distinct, (\d+) cache hits, (\d+) misses", res.stdout)
    seconds = float(re.search(r"kernels ([\d.]+)s", res.stdout).group(1))
    return res.stdout, seconds, dict(zip(("kernels", "hits", "misses"), map(int, counts.groups())))


def test_compile_twice_hits_cache(tmp_path):
    cache = tmp_path / "cache"
    out1, t1, c1 = run_compile(cache)
    assert c1["misses"] == c1["kernels"] > 5 and c1["hits"] == 0
    assert re.search(r"layer  0:\s+\d+ ops -> 6 launches", out1)
    out2, t2, c2 = run_compile(cache)
    assert c2 == {"kernels": c1["kernels"], "hits": c1["kernels"], "misses": 0}
    assert t1 >= 5 * t2, (t1, t2)
    # deleting one artifact recompiles exactly that kernel
    files = sorted(cache.rglob("*.ptx"))
    assert len(files) == c1["kernels"]
    victim = files[3]
    victim.unlink()
    out3, _, c3 = run_compile(cache)
    assert c3["misses"] == 1 and c3["hits"] == c1["kernels"] - 1
    assert victim.exists()
    compiled = re.findall(r"compiled\s+(\S+)", out3)
    assert len(compiled) == 1


def test_corrupt_cache_entries_are_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    _, _, c1 = run_compile(cache)
    files = sorted(cache.rglob("*.ptx"))
    good = files[0].read_bytes()
    files[0].write_bytes(good[: len(good) // 2])  # truncated
    files[1].write_bytes(os.urandom(2000))  # garbage
    out, _, c2 = run_compile(cache)
    assert c2["misses"] == 2 and "2 corrupt entries rebuilt" in out
    assert files[0].read_bytes() == good
    _, _, c3 = run_compile(cache)
    assert c3["misses"] == 0


def test_compile_explain_and_emit(tmp_path):
    out, _, counts = run_compile(tmp_path / "cache", "--explain", "--emit-dir", str(tmp_path / "ptx"))
    assert "op     layers.3.qkv.out: matmul" in out
    assert re.search(r"launch layers\.3\.qkv\.out \[add_rms_norm_gemv\] covers layers\.2\.mlp_residual, "
                     r"layers\.3\.input_norm\.out, layers\.3\.qkv\.out", out)
    emitted = list((tmp_path / "ptx").glob("*.ptx"))
    assert len(emitted) == counts["kernels"]
    assert all(b".target sm_90" in p.read_bytes() for p in emitted)


def test_compile_explain_shows_a_moe_layer_and_the_weights_a_decode_step_reads(tmp_path, tiny_checkpoints):
    """Mixtral's sparse MLP as launches (router fused with the residual add and norm, the
    experts' gate|up, their down with SiLU·mul and the routing sum), and the share of the
    weights one sequence's decode step reads: top-2 of 5 experts, one embedding row."""
    out, _, _ = run_compile(tmp_path / "cache", "--model", str(tiny_checkpoints["mixtral"]), "--explain")
    assert re.search(r"launch layers\.0\.route \[add_rms_norm_moe_route\] covers layers\.0\.attn_residual, "
                     r"layers\.0\.post_norm\.out, layers\.0\.route", out)
    assert "[moe_gemv] covers layers.0.experts_gate_up.out" in out
    assert re.search(r"\[silu_mul_moe_gemv\] covers layers\.0\.experts_act, layers\.0\.experts_down\.out", out)
    m = load_model(str(tiny_checkpoints["mixtral"]), with_weights=False)
    sizes = m.weight_bytes()
    experts = sum(v for k, v in sizes.items() if ".experts_" in k)
    table = sizes["embed_tokens"]
    read = sum(sizes.values()) - experts * 3 / 5 - table + table / m.config.vocab_size
    pct = int(re.search(r"a decode step of one sequence reads [\d.]+ \w+ of [\d.]+ \w+ of weights \((\d+)%\)",
                        out).group(1))
    assert pct == round(100 * read / sum(sizes.values()))


def copy_generator_sources(dst: Path) -> tuple[Path, ...]:
    """A copy of the sources the kernel cache key hashes, laid out like the originals."""
    roots = []
    for root in compiler.GENERATOR_ROOTS:
        if root.is_dir():
            shutil.copytree(root, dst / root.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(root, dst / root.name)
        roots.append(dst / root.name)
    return tuple(roots)


def test_editing_a_helper_outside_the_class_hierarchy_misses_the_cache(tmp_path, monkeypatch):
    # SampleRows' classes live in kernels/sampling.py, elementwise.py and base.py; its
    # Gumbel draws come from kernels/random.py. Edit a copy of random.py, never the source.
    original, unchanged, edited = (copy_generator_sources(tmp_path / name) for name in ("a", "b", "c"))
    random_py = tmp_path / "c" / "kernels" / "random.py"
    random_py.write_text(random_py.read_text() + "\n# an edit to the sampling kernels' hash\n")
    kernel, cache = SampleRows(257), KernelCache(tmp_path / "cache")

    monkeypatch.setattr(compiler, "GENERATOR_ROOTS", original)
    compiler.compile_kernel(kernel, HOST, cache)
    assert compiler.is_cached(kernel, HOST, cache)
    monkeypatch.setattr(compiler, "GENERATOR_ROOTS", unchanged)  # same content elsewhere: still a hit
    assert compiler.is_cached(kernel, HOST, cache)
    monkeypatch.setattr(compiler, "GENERATOR_ROOTS", edited)
    assert not compiler.is_cached(kernel, HOST, cache)
    # the specialisation is part of the key too
    monkeypatch.setattr(compiler, "GENERATOR_ROOTS", original)
    assert not compiler.is_cached(SampleRows(258), HOST, cache)
