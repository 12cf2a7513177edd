"""Kernels that read GGUF block-quantized weights: the GEMV family (every format x
prologue x 3 sizes) and the embedding gather (every format x 3 sizes x output dtype),
against numpy over gguf's own dequantization (the oracle), on the host with the output
poisoned, and the PTX through ptxas for sm_80 / sm_90. The banded forms (q4_1x16 ..) are
the host's int8 dots' layout: their GEMVs quantize activations (the oracle quantizes
them too: quantize_activations_reference) and never reach a GPU."""
from __future__ import annotations

import subprocess
import zlib
from dataclasses import replace

import numpy as np
import pytest

from fusec.fusion import ops
from fusec.fusion.codegen.target import HOST, parse_arch
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType, from_storage, round_to
from fusec.fusion.plan import has_int8_dots
from fusec.kernels.elementwise import Embed
from fusec.kernels.gemv import PROLOGUES, Gemv, vector_width
from fusec.kernels.quant import BAND, FORMATS, GGUF_FORMATS, dequantize, quantize_activations_reference
from fusec.kernels.testing import random_blocks
from fusec.runtime.backends.cpu import HostDevice
from test_patterns import cache, ptxas  # noqa: F401 (cache: the module's kernel cache fixture)

# (K, N) per block size: one block, a few, a real model's width; N % 4 != 0 (banded: whole bands)
SIZES = {32: [(32, 5), (96, 33), (576, 130)], 256: [(256, 5), (768, 33), (1536, 130)],
         "banded": [(32, BAND), (96, 3 * BAND), (576, 9 * BAND)]}
# banded forms run int8 dots: a CPU with AVX-512 VNNI
needs_vnni = pytest.mark.skipif(not has_int8_dots(HOST), reason="the CPU has no AVX-512 VNNI")
CASES = [pytest.param(fmt, k, n, marks=[needs_vnni] if f.banded else [])
         for fmt, f in sorted(FORMATS.items()) for k, n in SIZES["banded" if f.banded else f.block]]
ALL_FORMATS = [pytest.param(fmt, marks=[needs_vnni] if f.banded else []) for fmt, f in sorted(FORMATS.items())]
EPS = 1e-5


@pytest.fixture(scope="module")
def device(cache):
    dev = HostDevice(cache)
    yield dev
    dev.close()


def inputs(prologue: str, rows: int, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {"none": {"x": k}, "gelu": {"x": k}, "rms_norm": {"x": k, "norm_w": None},
              "add_rms_norm": {"a": k, "b": k, "norm_w": None},
              "rms_norm_add_rms_norm": {"a": k, "b": k, "post_w": None, "norm_w": None},
              "layer_norm": {"x": k, "norm_w": None, "norm_b": None},
              "add_layer_norm": {"a": k, "b": k, "norm_w": None, "norm_b": None},
              "silu_mul": {"gu": 2 * k}, "gelu_tanh_mul": {"gu": 2 * k}}[prologue]
    out = {name: rng.standard_normal((rows, width)).astype(np.float32) for name, width in shapes.items() if width}
    for name in ("norm_w", "post_w"):
        if name in shapes:
            out[name] = (1 + 0.3 * rng.standard_normal(k)).astype(np.float32)
    if "norm_b" in shapes:
        out["norm_b"] = (0.5 * rng.standard_normal(k)).astype(np.float32)
    for name in ("x", "a"):  # rows with a mean: a LayerNorm must take it away
        if "layer" in prologue and name in out:
            out[name] += 2.0
    return out


def reference(prologue: str, args: dict[str, np.ndarray], w: np.ndarray, bias: np.ndarray | None,
              int8: bool = False) -> np.ndarray:
    x = activations(prologue, args)
    y = ops.matmul(quantize_activations_reference(x) if int8 else x, w)
    return y if bias is None else y + bias


def activations(prologue: str, args: dict[str, np.ndarray]) -> np.ndarray:
    if prologue == "none":
        x = args["x"]
    elif prologue == "gelu":
        x = ops.gelu(args["x"])
    elif prologue == "rms_norm":
        x = ops.rms_norm(args["x"], args["norm_w"], eps=EPS)
    elif prologue == "add_rms_norm":
        x = ops.rms_norm(args["a"] + args["b"], args["norm_w"], eps=EPS)
    elif prologue == "rms_norm_add_rms_norm":
        x = ops.rms_norm(args["a"] + ops.rms_norm(args["b"], args["post_w"], eps=EPS), args["norm_w"], eps=EPS)
    elif prologue == "layer_norm":
        x = ops.layer_norm(args["x"], args["norm_w"], args["norm_b"], eps=EPS)
    elif prologue == "add_layer_norm":
        x = ops.layer_norm(args["a"] + args["b"], args["norm_w"], args["norm_b"], eps=EPS)
    elif prologue == "gelu_tanh_mul":
        x = ops.gelu_tanh_mul(args["gu"])
    else:
        x = ops.silu_mul(args["gu"])
    return x


def kernel(fmt: str, prologue: str, k: int, n: int, bias: bool = False) -> Gemv:
    # 24 rows a block: host chunks of 8 / 4 rows, the last block ragged for every N here
    # (banded: 32, two bands, the last block half empty where N is an odd number of bands);
    # host tiles of 4 token rows (the tests' 7 rows: a tile of 4, then one of 3)
    banded = FORMATS[fmt].banded
    return Gemv(k=k, n=n, act=DType.F32, weight=DType.F32, out=DType.F32, prologue=prologue, bias=bias,
                eps=EPS if "norm" in prologue else 0.0, vec=vector_width(k, DType.F32), weight_format=fmt,
                rows_per_block=2 * BAND if banded else 24, tokens_per_block=4, int8_dots=banded)


@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("fmt,k,n", CASES)
def test_quantized_gemv_equals_dequantized_reference(fmt, prologue, k, n, device):
    rng = np.random.default_rng(zlib.crc32(f"{fmt} {prologue} {k}".encode()))
    rows = 7
    packed = random_blocks(rng, n, k, FORMATS[fmt], std=1 / np.sqrt(k))
    assert packed.shape == (n, FORMATS[fmt].row_bytes(k)) and packed.dtype == np.uint8
    bias = rng.standard_normal(n).astype(np.float32) if prologue == "none" else None
    args = inputs(prologue, rows, k, rng)
    banded = FORMATS[fmt].banded
    want = reference(prologue, args, dequantize(packed, FORMATS[fmt]), bias, int8=banded)
    spec = kernel(fmt, prologue, k, n, bias=bias is not None)
    y = np.full((rows, n), np.nan, np.float32)  # poisoned: an unwritten element fails
    by_name = {**args, "w": packed, "bias": bias, "y": y}
    device.launch_kernel(spec, [by_name[p.name] for p in spec.params()[:-1]] + [np.int32(rows)],
                         spec.grid({"num_rows": rows}))
    err = np.abs(y.astype(np.float64) - want).max() / np.abs(want).max()
    # K-quants take each sub-block's minimum times the sum of its activations away from its scaled dot
    # (as llama.cpp does): a LayerNorm's bias gives the activations a mean, and that difference loses a few
    # more float32 bits
    tolerance = 5e-5 if "layer" in prologue and fmt.endswith("_k") else 2e-6
    if banded and prologue != "none":
        tolerance = 2e-5  # the kernel's prologue may differ from numpy's in a last bit: a quantized step moves
    assert np.isfinite(y).all() and err < tolerance, f"{fmt} {prologue} {k}x{n}: relative error {err:.3g}"


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_each_weight_decodes_as_gguf_does(fmt, device):
    """Every quant value of every block position (not only their dot products): one-hot
    activations pick single weights, so a swapped nibble or a wrong high bit shows."""
    k, n = 2 * FORMATS[fmt].block, (BAND if FORMATS[fmt].banded else 4)
    rng = np.random.default_rng(7)
    packed = random_blocks(rng, n, k, FORMATS[fmt])
    spec = kernel(fmt, "none", k, n)
    eye = np.eye(k, dtype=np.float32)
    y = np.full((k, n), np.nan, np.float32)
    device.launch_kernel(spec, [eye, packed, y, np.int32(k)], spec.grid({"num_rows": k}))
    if FORMATS[fmt].banded:  # a one-hot row quantizes to 127 steps of 1 / 127: a last bit may move
        np.testing.assert_allclose(y.T, dequantize(packed, FORMATS[fmt]), rtol=3e-7, atol=0)
    else:
        np.testing.assert_array_equal(y.T, dequantize(packed, FORMATS[fmt]))


def test_formats_need_whole_blocks():
    with pytest.raises(ValueError, match="whole blocks"):
        kernel("q4_0", "none", 48, 8)
    with pytest.raises(ValueError, match="whole blocks of 256"):
        kernel("q4_k", "none", 576, 8)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_quantized_gemv_ptx_assembles(arch, cache, tmp_path):
    tool = ptxas()
    if tool is None:
        pytest.skip("ptxas not found")
    target = parse_arch(arch)
    # a prologue's code does not depend on the weight format's, nor a format's decode on the prologue:
    # every format under one prologue, and every prologue over one format (a K-quant, the most involved)
    # assemble what all pairs would, in a fraction of the time
    pairs = [(fmt, "add_rms_norm") for fmt in sorted(GGUF_FORMATS)] + [("q4_k", p) for p in PROLOGUES]
    for fmt, prologue in pairs:
        spec = replace(kernel(fmt, prologue, *SIZES[FORMATS[fmt].block][-1], bias=prologue == "none"),
                       tokens_per_block=1)
        path = tmp_path / f"{spec.name}.ptx"
        path.write_bytes(compile_kernel(spec, target, cache).data)
        res = subprocess.run([tool, f"-arch={arch}", str(path), "-o", str(tmp_path / "out.cubin")],
                             capture_output=True, text=True)
        assert res.returncode == 0, f"{fmt} {prologue}: {res.stderr[:2000]}"


@pytest.mark.parametrize("out", [DType.F32, DType.F16, DType.BF16], ids=lambda d: d.value)
@pytest.mark.parametrize("fmt,cols,vocab", CASES)
def test_quantized_embedding_gather_decodes_only_its_rows(fmt, cols, vocab, out, device):
    rng = np.random.default_rng(zlib.crc32(f"embed {fmt} {cols} {out}".encode()))
    table = random_blocks(rng, vocab, cols, FORMATS[fmt])
    ids = rng.integers(0, vocab, 9).astype(np.int32)  # repeats and gaps
    spec = Embed(cols=cols, table=out, out=out, table_format=fmt)
    # poisoned: all-ones bytes are NaN in every float dtype
    y = np.full(len(ids) * cols * out.itemsize, 0xFF, np.uint8).view(out.storage).reshape(len(ids), cols)
    device.launch_kernel(spec, [ids, table, y, np.int32(len(ids))], spec.grid({"num_rows": len(ids)}))
    want = round_to(dequantize(table, FORMATS[fmt])[ids], out)
    np.testing.assert_array_equal(from_storage(y, out), want)


def test_embedding_formats_need_whole_blocks():
    with pytest.raises(ValueError, match="whole blocks"):
        Embed(cols=40, table=DType.F32, out=DType.F32, table_format="q8_0")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_quantized_embedding_ptx_assembles(arch, cache, tmp_path):
    tool = ptxas()
    if tool is None:
        pytest.skip("ptxas not found")
    for fmt in sorted(GGUF_FORMATS):
        spec = Embed(cols=SIZES[FORMATS[fmt].block][-1][0], table=DType.F16, out=DType.F16, table_format=fmt)
        path = tmp_path / f"{spec.name}.ptx"
        path.write_bytes(compile_kernel(spec, parse_arch(arch), cache).data)
        res = subprocess.run([tool, f"-arch={arch}", str(path), "-o", str(tmp_path / "out.cubin")],
                             capture_output=True, text=True)
        assert res.returncode == 0, f"{fmt}: {res.stderr[:2000]}"
