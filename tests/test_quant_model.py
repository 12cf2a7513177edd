"""Quantized weights through the whole engine: GGUF block formats kept as stored, HF
checkpoints quantized at load, the host's tiled GEMMs on them, and greedy output of the
fused plans equal to the reference interpreter on the same (dequantized) weights."""
from __future__ import annotations

import subprocess

import gguf
import numpy as np
import pytest

from conftest import make_hf_model
from helpers import engine_generate
from server_helpers import FUSEC
from test_gguf import QUANT_SPEC, decode_blocks, write_gguf
from test_patterns import cache  # noqa: F401 (the module's kernel cache fixture)
from fusec.errors import ModelLoadError
from fusec.fusion.dtypes import DType, from_storage
from fusec.kernels.quant import FORMATS, dequantize, quantize
from fusec.models.loader import load_model
from fusec.runtime.backends.cpu import HostDevice
from fusec.runtime.device import GemmShape
from fusec.runtime.sequence import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9], [2, 7, 1, 8], [1, 4, 1, 4, 2, 1, 3, 5, 6]]


@pytest.fixture(scope="module")
def hf_quant():
    return make_hf_model(QUANT_SPEC)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_gguf_block_formats_run_as_stored(fmt, hf_quant, tmp_path):
    qt = gguf.GGMLQuantizationType[fmt.upper()]
    raw = write_gguf(hf_quant, tmp_path / "m.gguf", qt)
    model = load_model(str(tmp_path / "m.gguf"))
    cfg = model.config
    assert set(model.formats.values()) == {fmt} and len(model.formats) == 1 + 4 * cfg.num_layers
    assert model.weight_types().startswith(f"{fmt} x{len(model.formats)}")
    # the bytes as stored (q rows moved as whole rows), nothing expanded
    np.testing.assert_array_equal(model.weights["layers.0.down"], raw["blk.0.ffn_down.weight"])
    h = cfg.hidden_size
    q = dequantize(model.weights["layers.1.qkv"], FORMATS[fmt])[: cfg.q_size]
    want = dequantize(raw["blk.1.attn_q.weight"], FORMATS[fmt])
    want = want.reshape(cfg.num_heads, cfg.head_dim // 2, 2, h).swapaxes(1, 2).reshape(-1, h)
    np.testing.assert_array_equal(q, want)
    # greedy output of the fused plans (quantized GEMVs, tiled GEMMs, host graphs) equals the
    # reference interpreter's on the same weights decoded to float32
    ref = engine_generate(model, PROMPTS, GREEDY, "reference")
    fused = engine_generate(model, PROMPTS, GREEDY, "fused", max_num_seqs=4)
    assert fused == ref
    assert len(set(map(tuple, ref))) > 1


def test_quantization_none_dequantizes_a_gguf(hf_quant, tmp_path):
    raw = write_gguf(hf_quant, tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q4_1)
    model = load_model(str(tmp_path / "m.gguf"), quantization="none")
    assert model.formats == {} and model.weight_types() == f"f32 x{len(model.weights)}"
    np.testing.assert_array_equal(model.weights["layers.0.down"],
                                  decode_blocks(raw["blk.0.ffn_down.weight"], gguf.GGMLQuantizationType.Q4_1,
                                                model.config.intermediate_size))


def test_dummy_weights_take_the_files_formats(hf_quant, tmp_path):
    write_gguf(hf_quant, tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q5_1)
    model = load_model(str(tmp_path / "m.gguf"), load_format="dummy")
    assert model.formats["layers.1.gate_up"] == "q5_1"
    w = model.weights["layers.1.gate_up"]
    assert w.dtype == np.uint8 and w.shape == (2 * model.config.intermediate_size, model.config.hidden_size // 32 * 24)
    assert engine_generate(model, PROMPTS[:1], GREEDY, "fused") == engine_generate(model, PROMPTS[:1], GREEDY)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_online_quantization_of_an_hf_checkpoint(fmt, tiny_checkpoints, tmp_path):
    hf = make_hf_model(QUANT_SPEC)
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), quantization=fmt)
    assert set(model.formats.values()) == {fmt} and "embed_tokens" in model.formats
    orig = hf.model.layers[0].mlp.down_proj.weight.detach().numpy()
    err = np.abs(dequantize(model.weights["layers.0.down"], FORMATS[fmt]) - orig).max() / np.abs(orig).max()
    assert 0 < err < {"q8_0": 1e-2, "q4_0": 0.2}[fmt]
    ref = engine_generate(model, PROMPTS, GREEDY, "reference")
    assert engine_generate(model, PROMPTS, GREEDY, "fused", max_num_seqs=4) == ref
    # matrices whose rows are not whole blocks stay dense: hidden 72 and intermediate 136
    # are not, the O projection's 6 heads x 16 = 96 inputs are
    odd = load_model(str(tiny_checkpoints["llama"]), quantization=fmt)
    assert sorted(odd.formats) == ["layers.0.o", "layers.1.o"]
    ref = engine_generate(odd, PROMPTS, GREEDY, "reference")
    assert engine_generate(odd, PROMPTS, GREEDY, "fused", max_num_seqs=4) == ref


def test_quantization_refusals(hf_quant, tmp_path):
    write_gguf(hf_quant, tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(ModelLoadError, match="its own types"):
        load_model(str(tmp_path / "m.gguf"), quantization="q4_0")
    with pytest.raises(ModelLoadError, match="CPU only"):
        load_model(str(tmp_path / "m.gguf"), quantization="q8_0", device="cuda")
    res = subprocess.run([*FUSEC, "generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "x",
                          "--quantization", "q4_0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "its own types" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("y_dtype", [DType.F32, DType.F16])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "q5_0"])
def test_host_gemm_decodes_tiles_of_quantized_weights(fmt, y_dtype, cache):
    """Several tiles per thread (a tiny tile size), ragged last tile, 2 and 3 threads."""
    rng = np.random.default_rng(3)
    n, k, tokens = 157, 96, 5
    w = quantize(rng.standard_normal((n, k)).astype(np.float32), FORMATS[fmt])
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    want = x @ dequantize(w, FORMATS[fmt]).T
    for threads in (2, 3):
        device = HostDevice(cache, threads=threads)
        gemm = device.gemm_library()
        gemm.TILE_BYTES = 7 * k * 4  # 7 rows a tile
        y = np.full((tokens, n), np.nan, y_dtype.storage)
        gemm.prepare(GemmShape(tokens, n, k, DType.F32, y_dtype, fmt), x, w, y)()
        got = from_storage(y, y_dtype)
        tol = 1e-5 if y_dtype is DType.F32 else 2e-3
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
        device.close()
