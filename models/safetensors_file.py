"""A memory-mapped safetensors reader on numpy, bf16 included (numpy has no bf16,
which is why the `safetensors` package's numpy API cannot read such checkpoints)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from fusec.errors import ModelLoadError
from fusec.fusion.dtypes import DType, from_storage

_DTYPES = {"F32": (np.float32, DType.F32), "F16": (np.float16, DType.F16),
           "BF16": (np.uint16, DType.BF16), "I32": (np.int32, DType.I32)}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: validated header, tensors as float32 on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(size - 8, MAX_HEADER):
                    raise ValueError(f"header length {header_len} exceeds the file")
                header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            header.pop("__metadata__", None)
            data_len = size - 8 - header_len
            _check_layout(header, data_len)
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        self.header: dict = header
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if data_len else None

    def names(self) -> list[str]:
        return list(self.header)

    @staticmethod
    def block_format(name: str) -> None:
        """safetensors checkpoints hold plain dtypes, no block formats."""
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get_f32(self, name: str) -> np.ndarray:
        info = self.header[name]
        np_dtype, dtype = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        raw = self._data[start:end] if self._data is not None else np.zeros(0, np.uint8)
        return from_storage(raw.view(np_dtype).reshape(info["shape"]), dtype)


def _check_layout(header: dict, data_len: int) -> None:
    """Each tensor's dtype, shape and byte range: non-negative integer dims whose bytes
    are exactly its range, inside the data and overlapping no other tensor's (a file
    whose tensors all point at offset 0 is corrupt, not a model)."""
    spans = []
    for name, info in header.items():
        dt = info["dtype"]
        if dt not in _DTYPES:
            raise ValueError(f"tensor {name}: unsupported dtype {dt}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise ValueError(f"tensor {name}: bad data offsets {offsets!r}")
        start, end = offsets
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dt][0]).itemsize
        if not (0 <= start <= end <= data_len and end - start == nbytes):
            raise ValueError(f"tensor {name}: data offsets {start}..{end} do not hold its {nbytes} bytes "
                             f"within the file's {data_len} data bytes")
        if end > start:
            spans.append((start, end, name))
    spans.sort()
    for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise ValueError(f"tensor {name} overlaps tensor {prev}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
