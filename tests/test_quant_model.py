"""Quantized weights through the whole engine: GGUF block formats kept as stored, HF
checkpoints quantized at load, the host's tiled GEMMs on them, and greedy output of the
fused plans equal to the reference interpreter on the same (dequantized) weights."""
from __future__ import annotations

import copy
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
from fusec.kernels.quant import FORMATS, QUANTIZABLE, dequantize
from fusec.kernels.testing import random_blocks
from fusec.models.loader import load_model
from fusec.runtime.backends.cpu import HostDevice
from fusec.runtime.device import GemmShape
from fusec.runtime.sequence import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9], [2, 7, 1, 8], [1, 4, 1, 4, 2, 1, 3, 5, 6]]


@pytest.fixture(scope="module")
def hf_quant():
    return make_hf_model(QUANT_SPEC)


@pytest.mark.parametrize("fmt", QUANTIZABLE)
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


def write_k_quant_gguf(path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A tiny Llama as a Q4_K_M-style file: q4_k matrices, v and a down projection in
    q6_k, the other down in q5_k, norms in f32. gguf has no K-quant quantizer, so the
    blocks are random (valid scales); returns each quantized tensor's bytes."""
    hidden, inter, heads, kv_heads, head_dim, vocab, layers = 256, 512, 4, 2, 64, 160, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    q = gguf.GGMLQuantizationType
    shapes = {"token_embd.weight": ((vocab, hidden), q.Q4_K), "output_norm.weight": ((hidden,), None)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": ((hidden,), None), f"blk.{i}.ffn_norm.weight": ((hidden,), None),
                   f"blk.{i}.attn_q.weight": ((heads * head_dim, hidden), q.Q4_K),
                   f"blk.{i}.attn_k.weight": ((kv_heads * head_dim, hidden), q.Q4_K),
                   f"blk.{i}.attn_v.weight": ((kv_heads * head_dim, hidden), q.Q6_K),
                   f"blk.{i}.attn_output.weight": ((hidden, heads * head_dim), q.Q4_K),
                   f"blk.{i}.ffn_gate.weight": ((inter, hidden), q.Q4_K),
                   f"blk.{i}.ffn_up.weight": ((inter, hidden), q.Q4_K),
                   f"blk.{i}.ffn_down.weight": ((hidden, inter), q.Q6_K if i == 0 else q.Q5_K)}
    raw = {}
    for name, (shape, qtype) in shapes.items():
        if qtype is None:
            w.add_tensor(name, (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32))
            continue
        std = 0.05 if name.startswith("token_embd") else 1 / np.sqrt(shape[1])
        raw[name] = random_blocks(rng, shape[0], shape[1], FORMATS[qtype.name.lower()], std)
        w.add_tensor(name, raw[name], raw_shape=raw[name].shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


def test_k_quant_gguf_runs_in_its_types(tmp_path):
    """A Q4_K_M-style file: the K-quant matrices run as stored; the fused q|k|v, whose
    parts mix q4_k and q6_k, runs re-quantized to q8_0; fused == reference."""
    raw = write_k_quant_gguf(tmp_path / "m.gguf", np.random.default_rng(11))
    model = load_model(str(tmp_path / "m.gguf"))
    assert model.formats == {"embed_tokens": "q4_k", **{f"layers.{i}.{part}": fmt for i in range(2) for part, fmt in
                             [("qkv", "q8_0"), ("o", "q4_k"), ("gate_up", "q4_k"), ("down", ("q6_k", "q5_k")[i])]}}
    np.testing.assert_array_equal(model.weights["layers.1.down"], raw["blk.1.ffn_down.weight"])
    np.testing.assert_array_equal(model.weights["embed_tokens"], raw["token_embd.weight"])
    v = dequantize(raw["blk.0.attn_v.weight"], FORMATS["q6_k"])
    v_run = dequantize(model.weights["layers.0.qkv"], FORMATS["q8_0"])[-v.shape[0]:]
    assert np.abs(v_run - v).max() <= np.abs(v).max() / 127 * 0.51 + 1e-7  # q8_0's rounding only
    ref = engine_generate(model, PROMPTS, GREEDY, "reference")
    assert engine_generate(model, PROMPTS, GREEDY, "fused", max_num_seqs=4) == ref
    assert len({t for seq in ref for t in seq}) > 3


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
@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "q5_0", "q4_k", "q6_k"])
def test_host_gemm_decodes_tiles_of_quantized_weights(fmt, y_dtype, cache):
    """Several tiles per thread (a tiny tile size), ragged last tile, 2 and 3 threads."""
    rng = np.random.default_rng(3)
    n, k, tokens = 157, 96 if FORMATS[fmt].block == 32 else 512, 5
    w = random_blocks(rng, n, k, FORMATS[fmt])
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


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_cpu_auto_runs_16bit_checkpoints_over_f32_activations(torch_dtype, tmp_path):
    """--dtype auto on the CPU keeps a 16-bit checkpoint's weights as stored (bit-exact,
    half the bytes of f32) and computes in f32: logits equal transformers in float32 on
    the same rounded weights, and greedy output of the fused plans (GEMVs reading the
    16-bit rows; with --crossover 1 the GEMMs decoding 16-bit tiles) equals the reference
    interpreter's."""
    import torch

    hf = make_hf_model(QUANT_SPEC)
    with torch.no_grad():  # weights rounded to 16 bits, the rest (rope frequencies) kept f32
        for p in hf.parameters():
            p.copy_(p.to(getattr(torch, torch_dtype)).float())
    copy.deepcopy(hf).to(getattr(torch, torch_dtype)).save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(str(tmp_path))
    sixteen = DType.BF16 if torch_dtype == "bfloat16" else DType.F16
    assert model.dtype is DType.F32 and model.weight_dtype is sixteen
    assert model.weight_types() == f"{sixteen.value} x{len(model.weights)}"
    down = hf.model.layers[1].mlp.down_proj.weight.detach().to(getattr(torch, torch_dtype))
    want = down.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(model.weights["layers.1.down"].view(np.uint16), want)
    ids = PROMPTS[0]
    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits[0, -1].numpy()
    engine_logits = engine_last_logits(model, ids)
    np.testing.assert_allclose(engine_logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())
    ref = engine_generate(model, PROMPTS, GREEDY, "reference")
    assert engine_generate(model, PROMPTS, GREEDY, "fused", max_num_seqs=4) == ref
    assert engine_generate(model, PROMPTS, GREEDY, "fused", max_num_seqs=4, crossover=1) == ref
    assert load_model(str(tmp_path), dtype="f32").weight_types() == f"f32 x{len(model.weights)}"


def engine_last_logits(model, ids: list[int]) -> np.ndarray:
    """The fused plans' logits for the prompt's last token."""
    from fusec.runtime.config import EngineConfig
    from fusec.runtime.model_runner import ModelRunner, SequenceChunk

    device = HostDevice(threads=2)
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=8, block_size=16), device, max_model_len=128)
    logits = runner.execute([SequenceChunk(ids, 0, [0, 1])])[0]
    runner.close()
    device.close()
    return logits


def test_int8_bands_are_the_gguf_blocks_regrouped():
    """load_model(int8_bands=True) bands the q8_0 / q4_0 / q4_1 matrices as it reads them
    (what the host's int8 dots read); with_int8_bands converts a loaded model either way;
    both hold exactly the file's blocks (band / unband are a permutation of bytes)."""
    from fusec.kernels.quant import band
    from fusec.models.loader import with_int8_bands

    plain = load_model(None)  # SmolLM2's Q4_1 GGUF: q4_1 matrices, a q8_0 embedding / LM head
    banded = load_model(None, int8_bands=True)
    assert set(banded.formats) == set(plain.formats)
    assert {banded.formats[n] for n in plain.formats} == {"q4_1x16", "q8_0x16"}
    assert with_int8_bands(banded, True) is banded and with_int8_bands(plain, False) is plain
    relaid, back = with_int8_bands(plain, True), with_int8_bands(banded, False)
    assert relaid.formats == banded.formats and back.formats == plain.formats
    for name in ("embed_tokens", "layers.0.qkv", "layers.29.down"):
        fmt = FORMATS[banded.formats[name]]
        np.testing.assert_array_equal(banded.weights[name], band(plain.weights[name], fmt))
        np.testing.assert_array_equal(relaid.weights[name], banded.weights[name])
        np.testing.assert_array_equal(back.weights[name], plain.weights[name])
        assert not np.array_equal(banded.weights[name], plain.weights[name])
    # banded weights have one reader, int8 dots: a plan without them says so
    from fusec.fusion.codegen.target import HOST
    from fusec.fusion.plan import PlanOptions, build_plan
    from fusec.kernels.registry import default_registry

    with pytest.raises(ValueError, match="off in this plan"):
        build_plan(banded.graph(), default_registry(), PlanOptions(HOST, 64, int8_activations=False), "gemv")
