"""What every format shares: the error type, dtypes, torch→numpy without loss, the order tensors travel in.

Tensors travel between formats as numpy arrays; bfloat16 is `ml_dtypes.bfloat16` (numpy has none), and
torch's bfloat16 crosses over as a view on 16-bit integers, so no value is ever rounded on the way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from llama_jax.model.config import ModelConfig
from llama_jax.model.params import TensorMap, tensor_maps
from llama_jax.utils import dtypes

FORMATS = ("meta", "hf", "orbax")


class ConvertError(ValueError):
    """A checkpoint cannot be converted; the message names the file and tensor at fault."""


def read_json_object(path: Path, kind: str) -> dict:
    """The JSON object in `path`, the file that makes a directory a `kind` checkpoint (strict: a missing
    file, bad UTF-8 or JSON, or anything but an object is a ConvertError naming the file)."""
    if not path.is_file():
        raise ConvertError(f"{path}: missing (not a {kind} checkpoint directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConvertError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_dtype(dtype, where: str) -> np.dtype:
    """`dtype` if it is one we convert (fp32/bf16/fp16), else a ConvertError naming `where`."""
    if dtypes.config_name(dtype) is None:
        raise ConvertError(f"{where}: unsupported dtype {np.dtype(dtype)}; expected float32, bfloat16 or float16")
    return np.dtype(dtype)


def torch_to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy with identical bits (bfloat16 via an int16 view)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


TRANSPOSE_BLOCK = 256  # columns per block when copying a transposed view: cache-friendly on both sides


def copy_into(out: np.ndarray, value: np.ndarray) -> None:
    """`out[...] = value`, fast for the transposed views layout changes produce.

    Equal dtypes move raw bits (numpy copies `ml_dtypes.bfloat16` element by element), and a transposed
    (Fortran-ordered) source is copied in column blocks, ~10x faster than numpy's strided copy.
    """
    if out.dtype == value.dtype:
        uint = np.dtype(f"u{out.dtype.itemsize}")
        out, value = out.view(uint), value.view(uint)
    if value.ndim == 2 and value.flags.f_contiguous and not value.flags.c_contiguous:
        for start in range(0, value.shape[1], TRANSPOSE_BLOCK):
            out[:, start:start + TRANSPOSE_BLOCK] = value[:, start:start + TRANSPOSE_BLOCK]
    else:
        out[...] = value


def contiguous(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`value` as a C-contiguous array of `dtype` (itself when it already is one)."""
    if value.dtype == dtype and value.flags.c_contiguous:
        return value
    out = np.empty(value.shape, dtype)
    copy_into(out, value)
    return out


def tensor_items(cfg: ModelConfig) -> Iterator[tuple[TensorMap, int | None]]:
    """Every (parameter, layer) pair in conversion order; layer is None for unstacked parameters."""
    for tmap in tensor_maps(cfg):
        for layer in (range(cfg.n_layers) if tmap.per_layer else (None,)):
            yield tmap, layer


def tensor_count(cfg: ModelConfig) -> int:
    return sum(1 for _ in tensor_items(cfg))
