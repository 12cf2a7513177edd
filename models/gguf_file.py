"""GGUF files through the `gguf` package: metadata, tensors dequantized to float32."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fusec.errors import ModelLoadError, UnsupportedModelError


def _reader_class():
    import gguf

    class PlainArrayReader(gguf.GGUFReader):
        """GGUFReader over a plain ndarray view of its memmap: the header parser slices
        the file hundreds of thousands of times, and np.memmap slices cost ~3x more."""

        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainArrayReader


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.reader = _reader_class()(str(path), "r")
            self.metadata: dict[str, Any] = {k: _field_value(f) for k, f in self.reader.fields.items()}
            self.tensors = {t.name: t for t in self.reader.tensors}
            _check_layout(self.reader.tensors, self.reader.data.size)
        except ModelLoadError:
            raise
        except Exception as e:  # the gguf package raises many kinds on bad input
            raise ModelLoadError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None

    def names(self) -> set[str]:
        return set(self.tensors)

    def block_format(self, name: str) -> str | None:
        """The tensor's GGUF block format if kernels read it natively (kernels/quant.py)."""
        from fusec.kernels.quant import GGUF_FORMATS

        t = self.tensors.get(name)
        kind = t.tensor_type.name.lower() if t is not None else None
        return kind if kind in GGUF_FORMATS else None

    def shape(self, name: str) -> tuple[int, ...]:
        """In numpy order (GGUF lists the innermost dimension first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def get_blocks(self, name: str) -> np.ndarray:
        """A block-quantized tensor's bytes as stored, [rows, bytes per row] (a view of the
        file's memory map: nothing is copied)."""
        t = self.tensors[name]
        rows = int(np.prod([int(d) for d in t.shape[1:]]))
        return t.data.reshape(rows, -1)

    def get_f32(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:  # any type gguf decodes: those kernels do not read natively run dense
            out = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise UnsupportedModelError(f"{self.path}: tensor {name} has type {t.tensor_type.name}, "
                                        "which the gguf package cannot decode") from None
        out = out.reshape(self.shape(name))
        # a float32 vector (a norm's weight, rope factors) decodes to a view of the memory
        # map: copied, so that a model keeping no stored blocks (banded weights) holds no
        # page of the file
        return out.copy() if out.ndim == 1 and np.may_share_memory(out, self.reader.data) else out


def _check_layout(tensors: list, file_size: int) -> None:
    """Every tensor's bytes inside the file and overlapping no other tensor's."""
    for t in tensors:
        if t.data_offset + t.n_bytes > file_size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"tensor {t.name} extends past the end of the file")
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in tensors if t.n_bytes)
    for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise ValueError(f"tensor {name} overlaps tensor {prev}")


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception as e:
        raise ValueError(f"unreadable metadata {field.name}: {e}") from None
