"""A `torch.save`-compatible file written one tensor at a time, so a shard is never assembled in memory.

`torch.save(dict)` keeps every tensor alive until it has written them all. The file it produces is a zip
archive (written by torch's own `PyTorchFileWriter`, which aligns and checksums the records) with one
record `data/<key>` of raw bytes per storage and a pickle `data.pkl` of the dict whose tensors refer to
those keys. Here each tensor's record is written as soon as its value arrives and the pickle, which
needs only names, shapes and dtypes, is written last; `torch.load(..., weights_only=True)` and
`mmap=True` read the result like any checkpoint.
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
from pathlib import Path
from typing import Sequence

import ml_dtypes
import numpy as np

STORAGE_ALIGNMENT = 64  # what torch.save uses: lets torch.load(mmap=True) map tensors in place
PICKLE_PROTOCOL = 2  # torch.save's default


def _storage_class(dtype: np.dtype):
    import torch

    return {np.dtype(np.float32): torch.FloatStorage, np.dtype(ml_dtypes.bfloat16): torch.BFloat16Storage,
            np.dtype(np.float16): torch.HalfStorage}[np.dtype(dtype)]


class _StorageRef:
    """Stands for record `data/<key>` in the pickle (written as a persistent id, like torch does)."""

    def __init__(self, key: str, storage_class, numel: int):
        self.key, self.storage_class, self.numel = key, storage_class, numel


class _TensorRef:
    """Pickles as the call torch uses to rebuild a contiguous tensor over a whole storage."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        import torch

        stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_class, obj.key, "cpu", obj.numel)
        return None


class StreamingTorchSave:
    """One file holding the planned (name, shape) tensors of one dtype; add them in plan order, then close."""

    def __init__(self, path: Path, plan: Sequence[tuple[str, tuple[int, ...]]], dtype: np.dtype):
        import torch

        self.path, self.dtype = path, np.dtype(dtype)
        self._plan = list(plan)
        self._next = 0
        self._writer = torch._C.PyTorchFileWriter(str(path), True, STORAGE_ALIGNMENT)

    def add(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._plan) or self._plan[self._next][0] != name:
            raise RuntimeError(f"{self.path}: got tensor {name}, planned {self._plan[self._next:self._next + 1]}")
        shape = self._plan[self._next][1]
        if tuple(array.shape) != tuple(shape) or array.dtype != self.dtype:
            raise RuntimeError(f"{self.path}: tensor {name} is {array.dtype}{array.shape}, planned {self.dtype}{shape}")
        import torch

        array = np.ascontiguousarray(array)  # written from its buffer, no copy when already contiguous
        if not array.flags.writeable:  # torch.from_numpy wants a writable buffer (it is only read here)
            array = array.copy()
        storage = torch.from_numpy(array.view(np.uint8).reshape(-1)).untyped_storage()
        self._writer.write_record(f"data/{self._next}", storage, array.nbytes)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plan):
            raise RuntimeError(f"{self.path}: closed with {len(self._plan) - self._next} planned tensors unwritten")
        storage_class = _storage_class(self.dtype)
        state = {name: _TensorRef(_StorageRef(str(i), storage_class, int(np.prod(shape))), shape)
                 for i, (name, shape) in enumerate(self._plan)}
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=PICKLE_PROTOCOL).dump(state)
        records = [("data.pkl", buffer.getvalue()), (".format_version", b"1"),
                   (".storage_alignment", str(STORAGE_ALIGNMENT).encode()), ("byteorder", sys.byteorder.encode())]
        for name, data in records:
            self._writer.write_record(name, data, len(data))
        self._writer.write_end_of_file()
