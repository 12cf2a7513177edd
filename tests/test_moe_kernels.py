"""The MoE kernels past the registry's examples (tests/test_patterns.py runs those):
block-quantized expert weights (host, and ptxas for sm_80 / sm_90), the expert GEMVs
reading only the routed experts' rows, corrupt routes kept in bounds, grouped gated
activations, and a whole MoE block's plan and result. `gpu_shapes` runs the GPU's
body of the expert GEMV on the host (one lane) instead of the host's tiles."""
from __future__ import annotations

import subprocess
import zlib

import numpy as np
import pytest

from fusec.fusion.codegen.target import HOST, parse_arch
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType, from_storage
from fusec.fusion.interpreter import Interpreter
from fusec.fusion.ir import Graph
from fusec.fusion.plan import PlanOptions, build_plan, has_int8_dots
from fusec.kernels.examples import Example, _act  # before moe_examples: it merges them after its helpers
from fusec.kernels.moe_examples import EXPERT_SHAPES, expert_graph, route_graph
from fusec.kernels.quant import FORMATS, GGUF_FORMATS, GROUP, dequantize, quantize_activations_reference
from fusec.kernels.registry import default_registry
from fusec.kernels.testing import check_pattern, random_weights, relative_error
from test_patterns import cache, ptxas  # noqa: F401 (cache: the module's kernel cache fixture)

REGISTRY = default_registry()
SHAPES = [None, True]  # PlanOptions.gpu_shapes: the host's tiles, the GPU's body
SHAPE_IDS = ["host", "gpu_body"]


def seeded(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def act_of(pattern: str) -> str | None:
    return None if pattern in ("moe_gemv", "moe_gemm") else pattern.removesuffix("_moe_gemv")


def experts_example(rng, size: int, pattern: str, **kw) -> Example:
    """The expert GEMVs' decode steps, or moe_gemm's batch past the crossover."""
    return expert_graph(rng, size, DType.F32, act_of(pattern), gemm=pattern == "moe_gemm", **kw)


def format_k(fmt: str, size: int) -> int:
    """K of whole blocks: one, three, two of them by size."""
    return FORMATS[fmt].block * [1, 3, 2][size]


def run_fused(ex: Example, weights: dict[str, np.ndarray], cache, gpu_shapes: bool | None = None,
              crossover: int = 8) -> tuple[list[str], dict[str, np.ndarray]]:
    """The host plan's launches' patterns and its outputs (poisoned first) as float32."""
    from fusec.runtime.backends.cpu import HostDevice
    from fusec.runtime.executor import PlanExecutor

    device = HostDevice(cache)
    executor = PlanExecutor(device, ex.graph, weights, REGISTRY,
                            PlanOptions(HOST, 256, crossover, gpu_shapes=gpu_shapes, int8_activations=False),
                            poison=True)
    plan = executor.plan_for(ex.tokens)
    got = {name: from_storage(device.to_host(buf), ex.graph.node(plan.resolve(name)).type.dtype)
           for name, buf in executor.run(ex.inputs).items()}
    executor.close()
    device.close()
    return [launch.pattern for launch in plan.launches], got


@pytest.mark.parametrize("gpu_shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("size", [0, 1, 2])
@pytest.mark.parametrize("pattern", ["moe_gemv", "silu_mul_moe_gemv", "moe_gemm"])
@pytest.mark.parametrize("fmt", sorted(GGUF_FORMATS))
def test_quantized_expert_gemv_equals_dequantized_reference(fmt, pattern, size, gpu_shapes, cache):
    rng = seeded(fmt, pattern, size)
    ex = experts_example(rng, size, pattern, weight_format=fmt, k=format_k(fmt, size))
    check_pattern(REGISTRY, pattern, ex, DType.F32, cache, seed=size, gpu_shapes=gpu_shapes)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_quantized_expert_gemv_ptx_assembles(arch, cache, tmp_path):
    tool = ptxas()
    if tool is None:
        pytest.skip("ptxas not found")
    target = parse_arch(arch)
    # x shared and outputs side by side (gate|up), x per slot and combined (down)
    for fmt in sorted(GGUF_FORMATS):
        for pattern, size in (("moe_gemv", 0), ("silu_mul_moe_gemv", 1)):
            ex = expert_graph(seeded(fmt), size, DType.F16, act_of(pattern), weight_format=fmt, k=format_k(fmt, 2))
            plan = build_plan(ex.graph, REGISTRY, PlanOptions(target, 256), ex.bucket())
            assert [launch.pattern for launch in plan.launches] == [pattern]
            for kernel in plan.kernels():
                path = tmp_path / f"{kernel.name}.ptx"
                path.write_bytes(compile_kernel(kernel, target, cache).data)
                res = subprocess.run([tool, f"-arch={arch}", str(path), "-o", str(tmp_path / "out.cubin")],
                                     capture_output=True, text=True)
                assert res.returncode == 0, f"{kernel.describe()}: {res.stderr[:2000]}"


F16_NAN = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)


@pytest.mark.parametrize("gpu_shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("size", [0, 1, 2])
@pytest.mark.parametrize("fmt", [None, "q8_0"], ids=["f32", "q8_0"])
@pytest.mark.parametrize("pattern", ["moe_gemv", "silu_mul_moe_gemv", "moe_gemm"])
def test_expert_gemv_reads_only_routed_experts(pattern, fmt, size, gpu_shapes, cache):
    """Every token routes among `slots` of the experts; the others' rows are NaN (dense),
    or their q8_0 blocks' scales are: one read of them would make the output NaN."""
    experts, slots = EXPERT_SHAPES[size][:2]
    rng = seeded("only routed", pattern, fmt, size)
    routed = np.sort(rng.permutation(experts)[:slots])
    ex = experts_example(rng, size, pattern, weight_format=fmt, k=format_k(fmt, size) if fmt else None,
                         among=routed)
    weights = random_weights(ex, rng)
    want = Interpreter(ex.graph, weights).run(ex.inputs, {})["moe"]
    w = weights["w"].copy()
    per_expert = w.reshape(experts, -1, w.shape[1])  # a view: [expert, its rows, row]
    unrouted = np.setdiff1d(np.arange(experts), routed)
    if fmt is None:
        per_expert[unrouted] = np.nan
    else:
        blocks = per_expert.reshape(experts, per_expert.shape[1], -1, FORMATS[fmt].nbytes)
        blocks[unrouted, :, :, 0:2] = F16_NAN  # each block's scale d
    patterns, got = run_fused(ex, {**weights, "w": w}, cache, gpu_shapes)
    assert pattern in patterns
    assert np.isfinite(got["moe"]).all()
    assert relative_error(got["moe"], want) < 1e-5


@pytest.mark.parametrize("gpu_shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("pattern", ["moe_gemv", "silu_mul_moe_gemv", "moe_gemm"])
def test_corrupt_route_ids_are_clamped_into_the_experts(pattern, gpu_shapes, cache):
    """Ids below 0 read expert 0, past the end (and NaN) the last: never out of bounds."""
    rng = seeded("corrupt", pattern)
    ex = experts_example(rng, 1, pattern)  # 6 experts, 3 slots; 3 tokens (17 for moe_gemm)
    experts, slots = EXPERT_SHAPES[1][:2]
    t = ex.tokens
    corrupt = np.resize(np.array([[-7.0, 1e9, np.nan], [np.inf, -np.inf, 2.0], [-0.0, 6.0, 5.0]], np.float32),
                        (t, slots))
    clamped = np.resize(np.array([[0, 5, 5], [5, 0, 2], [0, 5, 5]], np.float32), (t, slots))
    weights = random_weights(ex, rng)
    route = ex.inputs["route"]
    ex.inputs["route"] = np.concatenate([clamped, route[:, slots:]], axis=1)
    want = Interpreter(ex.graph, weights).run(ex.inputs, {})["moe"]
    ex.inputs["route"] = np.concatenate([corrupt, route[:, slots:]], axis=1)
    _, got = run_fused(ex, weights, cache, gpu_shapes)
    assert relative_error(got["moe"], want) < 1e-5


@pytest.mark.parametrize("fmt", [None, "q8_0"], ids=["f32", "q8_0"])
@pytest.mark.parametrize("act,combine", [(None, False), ("silu_mul", True)], ids=["gate_up", "down"])
def test_host_expert_tiles_group_a_large_batch(act, combine, fmt, cache):
    """600 tokens in the gemv bucket: token tiles (the last one short), each expert's
    pairs in tiles of 8 and a ragged rest, uneven expert loads (one expert picked by
    most tokens, one by none), a token picking one expert twice (both count)."""
    from fusec.kernels.moe import HOST_PAIRS

    rng = seeded("large batch", act, fmt)
    t, k, n, experts, slots = 600, 64, 23, 5, 3
    g, inputs = Graph("example"), {}
    per_slot = act is not None
    if act is None:
        x = _act(g, rng, "x", t, k, DType.F32, inputs)
    else:
        x = g.op(act, [_act(g, rng, "gu", t, 2 * slots * k, DType.F32, inputs)], ("T", slots * k), DType.F32,
                 name="act", groups=slots)
    ids = np.where(rng.random((t, slots)) < 0.6, 0, rng.integers(1, experts - 1, (t, slots)))  # 4: never
    ids[7] = [2, 2, 1]
    inputs["route"] = np.concatenate([ids, 0.2 + rng.random((t, slots))], axis=1).astype(np.float32)
    route = g.input("route", ("T", 2 * slots), DType.F32)
    w = g.weight("w", (experts * n, k), DType.F32, format=fmt)
    g.set_outputs(g.op("moe_matmul", [x, route, w], ("T", n if combine else slots * n), DType.F32, name="moe",
                       experts=experts, slots=slots, combine=combine))
    ex = Example(g, inputs)
    plan = build_plan(g, REGISTRY, PlanOptions(HOST, 256, t), "gemv")
    (kernel,) = [launch.kernel for launch in plan.launches if launch.pattern.endswith("moe_gemv")]
    assert kernel.host_tiles and 1 < kernel.tokens_per_block < t and t % kernel.tokens_per_block
    assert (ids[:kernel.tokens_per_block] == 0).sum() > 2 * HOST_PAIRS  # expert 0 fills pair tiles in a tile
    weights = random_weights(ex, rng)
    want = Interpreter(g, weights).run(inputs, {})["moe"]
    patterns, got = run_fused(ex, weights, cache, crossover=t)
    assert patterns[-1] == ("moe_gemv" if act is None else "silu_mul_moe_gemv")
    assert relative_error(got["moe"], want) < 1e-5


def grouped_activation(kind: str, t: int, k: int, groups: int, dtype: DType, then_matmul: bool) -> Example:
    rng = seeded(kind, t, groups, dtype.value)
    g, inputs = Graph("example"), {}
    gu = _act(g, rng, "gu", t, groups * 2 * k, dtype, inputs)
    y = g.op(kind, [gu], ("T", groups * k), dtype, name="act", groups=groups)
    if then_matmul:
        y = g.op("matmul", [y, g.weight("w", (37, groups * k), dtype)], ("T", 37), dtype, name="proj")
    g.set_outputs(y)
    return Example(g, inputs)


@pytest.mark.parametrize("dtype", [DType.F32, DType.BF16], ids=lambda d: d.value)
@pytest.mark.parametrize("kind", ["silu_mul", "gelu_tanh_mul"])
def test_grouped_activation_row_kernel(kind, dtype, cache):
    check_pattern(REGISTRY, kind, grouped_activation(kind, 9, 67, 3, dtype, then_matmul=False), dtype, cache)


@pytest.mark.parametrize("kind", ["silu_mul", "gelu_tanh_mul"])
def test_gemv_prologue_refuses_grouped_activation(kind, cache):
    """A GEMV's gated prologue reads one [gate | up] a row: a grouped one is a row kernel."""
    ex = grouped_activation(kind, 2, 40, 2, DType.F32, then_matmul=True)
    plan = build_plan(ex.graph, REGISTRY, PlanOptions(HOST, 256), ex.bucket())
    assert [launch.pattern for launch in plan.launches] == [kind, "gemv"]
    check_pattern(REGISTRY, "gemv", ex, DType.F32, cache)


def moe_block(t: int, dtype: DType, hidden: int, inter: int, fmt: str | None) -> Example:
    """One MoE MLP block as a model builds it: a routed top-2 of 8 and a gated shared
    expert, the sum escaping into the residual add after the experts."""
    rng = seeded("block", t, dtype.value, fmt)
    routing = dict(experts=8, top_k=2, shared=1, shared_gate=True, renormalize=True)
    total, slots = 9, 3
    g, inputs = Graph("example"), {}
    residual, attn = (_act(g, rng, name, t, hidden, dtype, inputs) for name in ("residual", "attn"))
    s = g.op("add", [residual, attn], ("T", hidden), dtype, name="sum")
    xn = g.op("rms_norm", [s, g.weight("norm_w", (hidden,), dtype)], ("T", hidden), dtype, name="xn", eps=1e-6)
    route = route_graph(g, xn, hidden, dtype, routing)
    gu = g.op("moe_matmul", [xn, route, g.weight("w_gate_up", (total * 2 * inter, hidden), dtype, format=fmt)],
              ("T", slots * 2 * inter), dtype, name="gu", experts=total, slots=slots)
    act = g.op("silu_mul", [gu], ("T", slots * inter), dtype, name="act", groups=slots)
    y = g.op("moe_matmul", [act, route, g.weight("w_down", (total * hidden, inter), dtype, format=fmt)],
             ("T", hidden), dtype, name="y", experts=total, slots=slots, combine=True)
    g.set_outputs(g.op("add", [s, y], ("T", hidden), dtype, name="out"))
    return Example(g, inputs)


# a decode step's GEMVs; a batch's grouped GEMMs (a GPU's expert GEMV kernels) with the activation between
BLOCK_LAUNCHES = {"gemv": ["add_rms_norm_moe_route", "moe_gemv", "silu_mul_moe_gemv", "add"],
                  "gemm": ["add_rms_norm_moe_route", "moe_gemm", "silu_mul", "moe_gemm", "add"]}


@pytest.mark.parametrize("t", [1, 4, 20], ids=["T1", "T4", "T20-gemm"])
@pytest.mark.parametrize("dtype,hidden,inter,fmt", [(DType.F32, 72, 40, None), (DType.BF16, 72, 40, None),
                                                    (DType.F32, 96, 64, "q8_0"), (DType.F32, 256, 256, "q4_k")],
                         ids=["f32", "bf16", "q8_0", "q4_k"])
def test_moe_block_plan_and_result(dtype, hidden, inter, fmt, t, cache):
    """Three launches in the gemv bucket (the residual add joins the next layer's first
    GEMV in a model), four in the gemm bucket, on the host and the GPU, and the
    reference's result."""
    ex = moe_block(t, dtype, hidden, inter, fmt)
    for target in (HOST, parse_arch("sm_90")):
        plan = build_plan(ex.graph, REGISTRY, PlanOptions(target, 256), ex.bucket())
        assert [launch.pattern for launch in plan.launches] == BLOCK_LAUNCHES[ex.bucket()], target.arch
    for gpu_shapes in SHAPES:
        check_pattern(REGISTRY, "add_rms_norm_moe_route", ex, dtype, cache, seed=t, gpu_shapes=gpu_shapes)


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16], ids=lambda d: d.value)
def test_fused_router_with_private_sum_and_norm(dtype, cache):
    """Nothing else reads the sum or the normed row: the kernel writes the route only."""
    rng = seeded("private", dtype.value)
    g, inputs = Graph("example"), {}
    s = g.op("add", [_act(g, rng, "a", 4, 96, dtype, inputs), _act(g, rng, "b", 4, 96, dtype, inputs)], ("T", 96),
             dtype, name="sum")
    xn = g.op("rms_norm", [s, g.weight("norm_w", (96,), dtype)], ("T", 96), dtype, name="xn", eps=1e-6)
    g.set_outputs(route_graph(g, xn, 96, dtype, dict(experts=64, top_k=6, n_group=8, topk_group=3)))
    ex = Example(g, inputs)
    plan = build_plan(g, REGISTRY, PlanOptions(HOST, 256), ex.bucket())
    (launch,) = plan.launches
    assert launch.outputs == ("route",) and not launch.kernel.residual_out and not launch.kernel.normed_out
    check_pattern(REGISTRY, "add_rms_norm_moe_route", ex, dtype, cache)


@pytest.mark.skipif(not has_int8_dots(HOST), reason="the CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "q8_0x16", "q4_0x16", "q4_1x16"])
@pytest.mark.parametrize("act,combine", [(None, False), ("silu_mul", True)], ids=["gate_up", "down"])
def test_host_expert_tiles_take_int8_dots_for_lone_pairs(act, combine, fmt, cache):
    """int8_dots in the expert GEMV: over GGUF-form experts, an expert with one (token,
    slot) pair in a tile dots that pair's quantized prologue row with its bytes (as Gemv's
    one-token tiles) and experts with more pairs keep float activations; over banded ones
    (48 rows an expert: 3 bands) every pair takes them, a band at a time. Outputs
    poisoned, against numpy."""
    from fusec.kernels.moe import MoeGemv
    from fusec.kernels.testing import random_blocks
    from fusec.runtime.backends.cpu import HostDevice

    rng = seeded("int8 pairs", act, fmt, combine)
    t, k, n, experts, slots = 3, 4 * GROUP, (48 if FORMATS[fmt].banded else 37), 6, 2
    ids = np.array([[0, 1], [2, 1], [3, 4]])  # experts 0, 2, 3, 4: one pair each; expert 1: two
    weights = 0.2 + rng.random((t, slots))
    route = np.concatenate([ids, weights], axis=1).astype(np.float32)
    w = random_blocks(rng, experts * n, k, FORMATS[fmt], std=1 / np.sqrt(k))
    w_values = dequantize(w, FORMATS[fmt]).reshape(experts, n, k)
    spec = MoeGemv(k=k, n=n, act=DType.F32, weight=DType.F32, out=DType.F32, prologue=act or "none",
                   rows_per_block=16, weight_format=fmt, experts=experts, slots=slots, combine=combine,
                   per_slot=act is not None, host_tiles=True, tokens_per_block=8, int8_dots=True)
    if act is None:
        x = rng.standard_normal((t, k)).astype(np.float32)
        rows = np.repeat(x[:, None], slots, axis=1)  # [t, slot, k]: each slot reads the token's row
        args = {"x": x}
    else:
        gu = rng.standard_normal((t, slots * 2 * k)).astype(np.float32)
        halves = gu.reshape(t, slots, 2, k)
        rows = (halves[:, :, 0] / (1 + np.exp(-halves[:, :, 0])) * halves[:, :, 1]).astype(np.float32)  # SiLU(gate) up
        args = {"gu": gu}
    lone = np.isin(ids, [0, 2, 3, 4]) | FORMATS[fmt].banded
    rows = np.where(lone[..., None], quantize_activations_reference(rows), rows)
    per_pair = np.einsum("tsk,tsnk->tsn", rows, w_values[ids])
    want = (per_pair * weights[..., None]).sum(1) if combine else per_pair.reshape(t, slots * n)
    y = np.full(want.shape, np.nan, np.float32)
    device = HostDevice(cache)
    args |= {"route": route, "w": w, "y": y}
    device.launch_kernel(spec, [args[p.name] for p in spec.params()[:-1]] + [np.int32(t)], spec.grid({"num_rows": t}))
    device.close()
    assert np.isfinite(y).all() and relative_error(y, want) < 2e-6
