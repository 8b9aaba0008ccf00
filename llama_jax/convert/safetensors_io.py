"""The safetensors file format, read and written one tensor at a time with plain file I/O.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, then the raw little-endian bytes. Handling it directly (rather than through the
`safetensors` package) keeps bfloat16 lossless without torch (numpy gets `ml_dtypes.bfloat16`), reads
with `seek` + `readinto` instead of a memory map (pages of a map stay in the resident set until it is
closed, so a streamed conversion would grow to the file's size), and writes without first assembling
the whole file in memory: the header is planned from the model config, then tensors are appended.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Sequence

import ml_dtypes
import numpy as np

from llama_jax.convert.common import ConvertError

DTYPE_CODES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
CODE_OF = {v: k for k, v in DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} of a safetensors file, offsets made absolute.

    Strict, as the format requires: a JSON object of entries, each with a supported dtype, a shape of
    non-negative integers and `data_offsets` [begin, end] whose length is exactly dtype size × shape;
    together the ranges tile the data section (from 0 to the end of the file) without gap or overlap.
    Anything else is a ConvertError naming the file and the tensor.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConvertError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER_BYTES:
            raise ConvertError(f"{path}: not a safetensors file (header length {size})")
        text = f.read(size)
        data_bytes = f.seek(0, 2) - 8 - size
    if len(text) != size:
        raise ConvertError(f"{path}: header of {size} bytes is truncated ({len(text)} in the file)")
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConvertError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")
    header.pop("__metadata__", None)
    spans = sorted((_checked_span(path, name, entry), name) for name, entry in header.items())
    position = 0
    for (begin, end), name in spans:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves bytes [{position}, {begin}) unused"
            raise ConvertError(f"{path}: tensor {name}'s data_offsets [{begin}, {end}] {what}")
        position = end
    if position != data_bytes:
        raise ConvertError(f"{path}: the tensors cover {position} bytes of a {data_bytes}-byte data section")
    for entry in header.values():
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = (8 + size + begin, 8 + size + end)
    return header


def _checked_span(path: Path, name: str, entry) -> tuple[int, int]:
    """(begin, end) of one header entry, after checking its fields against each other."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ConvertError(f"{path}: tensor {name}: header entry must have exactly dtype, shape and "
                           f"data_offsets, got {entry!r}"[:300])
    dtype = tensor_dtype(path, name, entry)
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ConvertError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ConvertError(f"{path}: tensor {name}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    if dtype.itemsize * math.prod(d for d in shape if d) >= 2 ** 63:  # numpy's limit, zero dimensions aside
        raise ConvertError(f"{path}: tensor {name}: shape {shape!r} is too large for any array (2**63 bytes "
                           f"or more)"[:300])
    expected = dtype.itemsize * math.prod(shape)  # exact: Python integers do not overflow
    if offsets[1] - offsets[0] != expected:
        raise ConvertError(f"{path}: tensor {name} spans {offsets[1] - offsets[0]} bytes, its shape {tuple(shape)} "
                           f"needs {expected}")
    return offsets[0], offsets[1]


def tensor_dtype(path: Path, name: str, entry: dict) -> np.dtype:
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPE_CODES:
        raise ConvertError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}; "
                           f"expected one of {sorted(DTYPE_CODES)}")
    return DTYPE_CODES[entry["dtype"]]


def read_tensor(path: Path, name: str, entry: dict) -> np.ndarray:
    """One tensor of a file whose header entry is `entry` (from `read_header`)."""
    dtype = tensor_dtype(path, name, entry)  # the entry was checked whole by `read_header`
    begin, end = entry["data_offsets"]
    out = np.empty(tuple(entry["shape"]), dtype)
    with open(path, "rb") as f:
        f.seek(begin)
        if f.readinto(out.view(np.uint8).reshape(-1)) != end - begin:
            raise ConvertError(f"{path}: tensor {name} is truncated")
    return out


class StreamingWriter:
    """Writes one safetensors file whose tensors (names, shapes, dtype) are known before their values.

    Tensors must then be added in exactly the planned order; `close` checks that all of them were.
    """

    def __init__(self, path: Path, plan: Sequence[tuple[str, tuple[int, ...]]], dtype: np.dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in plan:
            nbytes = self.dtype.itemsize * int(np.prod(shape))
            header[name] = {"dtype": CODE_OF[self.dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        self._expected = list(plan)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)

    def add(self, name: str, array: np.ndarray) -> None:
        if not self._expected or self._expected[0][0] != name:
            raise RuntimeError(f"{self.path}: got tensor {name}, planned {self._expected[:1]}")
        expected_name, shape = self._expected.pop(0)
        if tuple(array.shape) != tuple(shape) or array.dtype != self.dtype:
            raise RuntimeError(f"{self.path}: tensor {name} is {array.dtype}{array.shape}, planned {self.dtype}{shape}")
        self._file.write(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)

    @property
    def complete(self) -> bool:
        return not self._expected

    def close(self) -> None:
        self._file.close()
        if self._expected:
            raise RuntimeError(f"{self.path}: closed with {len(self._expected)} planned tensors unwritten")
