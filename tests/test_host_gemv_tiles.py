"""Host GEMVs take tiles of token rows, with code specialised per tile height: every
height 1..8 of an 8-row tile (and a second, short tile, also in block ranges that start
mid-tile) for dense f32 / bf16 weights and three block formats, through the fullest
prologue (residual add + RMSNorm, the sum written out) with a bias, against numpy;
outputs and the residual poisoned."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fusec.fusion import ops
from fusec.fusion.codegen.target import HOST
from fusec.fusion.dtypes import DType, from_storage, to_storage
from fusec.fusion.plan import has_int8_dots
from fusec.kernels.gemv import Gemv, host_rows_per_chunk
from fusec.kernels.quant import FORMATS, GROUP, dequantize, quantize_activations_reference
from fusec.kernels.testing import random_blocks
from fusec.runtime.backends.cpu import HostDevice
from test_patterns import cache  # noqa: F401 (the module's kernel cache fixture)

K, N, EPS = 520, 75, 1e-5  # K: whole 16-wide steps and a ragged tail of 8 (dense rows)
TILE = 8


@pytest.fixture(scope="module")
def device(cache):
    dev = HostDevice(cache)
    yield dev
    dev.close()


def weights(kind: str, rng) -> tuple[np.ndarray, np.ndarray, DType, str | None]:
    """(stored weights, their float32 values, weight dtype, block format)."""
    if kind in FORMATS:
        k = 512 if FORMATS[kind].block == 256 else K - 8
        packed = random_blocks(rng, N, k, FORMATS[kind], std=1 / np.sqrt(k))
        return packed, dequantize(packed, FORMATS[kind]), DType.F32, kind
    dtype = DType(kind)
    w = to_storage((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32), dtype)
    return w, from_storage(w, dtype).astype(np.float32), dtype, None


@pytest.mark.parametrize("kind", ["f32", "bf16", "q4_1", "q8_0", "q6_k"])
def test_every_tile_height(kind, device):
    rng = np.random.default_rng(len(kind))
    w, w_values, dtype, fmt = weights(kind, rng)
    k = w_values.shape[1]
    spec = Gemv(k=k, n=N, act=DType.F32, weight=dtype, out=DType.F32, prologue="add_rms_norm", bias=True,
                residual_out=True, eps=EPS, rows_per_block=16, weight_format=fmt, tokens_per_block=TILE)
    norm_w = to_storage((1 + 0.3 * rng.standard_normal(k)).astype(np.float32), dtype)
    bias = to_storage(rng.standard_normal(N).astype(np.float32), dtype)
    fn = device.load(spec).fn
    # each height through the pool, then 2 tiles in block ranges that start mid-tile (as
    # threads' shares do): every range computes its tiles' prologue rows itself
    for rows, cuts in [(r, None) for r in range(1, TILE + 1)] + [(TILE + 3, None), (TILE + 3, (0, 3, 7, 10))]:
        a, b = (rng.standard_normal((rows, k)).astype(np.float32) for _ in range(2))
        y = np.full((rows, N), np.nan, np.float32)
        residual = np.full((rows, k), np.nan, np.float32)
        by_name = {"a": a, "b": b, "norm_w": norm_w, "residual": residual, "w": w, "bias": bias, "y": y}
        args = [by_name[p.name] for p in spec.params()[:-1]] + [np.int32(rows)]
        grid = spec.grid({"num_rows": rows})
        if cuts is None:
            device.launch_kernel(spec, args, grid)
        else:
            assert cuts[-1] == grid[0] * grid[1]
            for lo, hi in zip(cuts, cuts[1:]):
                fn(*[x.ctypes.data if isinstance(x, np.ndarray) and x.ndim else int(x) for x in args], grid[0], lo, hi)
        s = a + b
        want = ops.matmul(ops.rms_norm(s, from_storage(norm_w, dtype), eps=EPS), w_values) + from_storage(bias, dtype)
        np.testing.assert_array_equal(residual, s)
        err = np.abs(y.astype(np.float64) - want).max() / np.abs(want).max()
        assert np.isfinite(y).all() and err < 2e-6, f"{kind}, {rows} rows: relative error {err:.3g}"


def test_rows_per_chunk_keep_the_accumulators_in_registers():
    assert [host_rows_per_chunk(t, 64) for t in (1, 2, 3, 4, 5, 8, 9, 16)] == [8, 8, 4, 4, 2, 2, 1, 1]
    assert host_rows_per_chunk(1, 12) == 4  # divides the block's rows


@pytest.mark.skipif(not has_int8_dots(HOST), reason="the CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q8_0x16", "q4_0x16", "q4_1x16"])
def test_int8_dots_on_every_tile_height(kind, device):
    """int8_dots: the tile's prologue rows are quantized per group of 32, as
    quantize_activations_reference (qx and the rounding error qr), and dotted with the
    weights' bytes: banded weights (80 rows: 5 bands) a band of 16 rows at a time for every
    tile height; GGUF-form weights (75 rows) row by row in one-token tiles, taller tiles in
    floats. Without a prologue the kernel quantizes the very floats the oracle does."""
    rng = np.random.default_rng(40 + len(kind))
    fmt = FORMATS[kind]
    k, n = K - 8, (80 if fmt.banded else N)
    w = random_blocks(rng, n, k, fmt, std=1 / np.sqrt(k))
    w_values = dequantize(w, fmt)
    spec = Gemv(k=k, n=n, act=DType.F32, weight=DType.F32, out=DType.F32, bias=True, rows_per_block=16,
                weight_format=kind, tokens_per_block=TILE, int8_dots=True)
    bias = rng.standard_normal(n).astype(np.float32)
    for rows in (1, 2, 3, 5, TILE, TILE + 1):  # the last: a full tile, then a one-token tile
        x = rng.standard_normal((rows, k)).astype(np.float32)
        x[0, :GROUP] = 0  # a group of zeros (dx = 0)
        y = np.full((rows, n), np.nan, np.float32)
        device.launch_kernel(spec, [x, w, bias, y, np.int32(rows)], spec.grid({"num_rows": rows}))
        in_float = ops.matmul(x, w_values) + bias
        int8 = np.array([fmt.banded or (rows - r <= rows % TILE == 1) for r in range(rows)])
        want = np.where(int8[:, None], ops.matmul(quantize_activations_reference(x), w_values) + bias, in_float)
        err = np.abs(y.astype(np.float64) - want).max(axis=1) / np.abs(want).max()
        assert np.isfinite(y).all() and (err < 2e-6).all(), f"{kind}, {rows} rows: relative errors {err}"
        # each int8 row's float-activation result is outside that tolerance: the int8 path ran for it
        assert (np.abs(y - in_float)[int8].max(axis=1) / np.abs(want).max() > 2e-6).all()
    # the fullest prologue (residual add + RMSNorm, the sum written out): the kernel's norm
    # may differ from numpy's in a last bit, which can move a quantized step (~1e-6 here)
    full = Gemv(k=k, n=n, act=DType.F32, weight=DType.F32, out=DType.F32, prologue="add_rms_norm", bias=True,
                residual_out=True, eps=EPS, rows_per_block=16, weight_format=kind, tokens_per_block=TILE,
                int8_dots=True)
    norm_w = (1 + 0.3 * rng.standard_normal(k)).astype(np.float32)
    rows = 2 if fmt.banded else 1
    a, b = (rng.standard_normal((rows, k)).astype(np.float32) for _ in range(2))
    y = np.full((rows, n), np.nan, np.float32)
    residual = np.full((rows, k), np.nan, np.float32)
    by_name = {"a": a, "b": b, "norm_w": norm_w, "residual": residual, "w": w, "bias": bias, "y": y}
    device.launch_kernel(full, [by_name[p.name] for p in full.params()[:-1]] + [np.int32(rows)],
                         full.grid({"num_rows": rows}))
    np.testing.assert_array_equal(residual, a + b)
    want = ops.matmul(quantize_activations_reference(ops.rms_norm(a + b, norm_w, eps=EPS)), w_values) + bias
    assert np.abs(y - want).max() / np.abs(want).max() < 2e-5
    # one NaN in a one-token tile's input row (from corrupt weights upstream) makes every
    # output NaN, as in float: no prologue here, whose norm would spread it over the row
    # first (and no bias: banded outputs then go out in one vector store a band)
    plain = dataclasses.replace(spec, bias=False)
    x = rng.standard_normal((1, k)).astype(np.float32)
    x[0, 40] = np.nan
    y = np.zeros((1, n), np.float32)
    device.launch_kernel(plain, [x, w, y, np.int32(1)], plain.grid({"num_rows": 1}))
    assert np.isnan(y).all()
