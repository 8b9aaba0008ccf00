"""The floating-point types llama_jax stores and computes in, under every name it accepts.

Configs say `float32` / `bfloat16` / `float16` (`ModelConfig.dtype`, `param_dtype`); command lines say
`fp32` / `bf16` / `fp16`. numpy has no bfloat16: `ml_dtypes.bfloat16` is the one jax and the
converters share, so the tables below serve jax and numpy alike.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

CONFIG_NAMES = ("float32", "bfloat16", "float16")
FLAG_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NUMPY = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a config name or a flag name."""
    return NUMPY[FLAG_NAMES.get(name, name)]


def config_name(dtype) -> str | None:
    """`float32` / `bfloat16` / `float16` for one of the supported dtypes, else None."""
    return next((name for name, d in NUMPY.items() if d == np.dtype(dtype)), None)


def config_name_of_flag(flag: str, allowed: tuple[str, ...] = tuple(FLAG_NAMES)) -> str:
    """The config name of a command-line dtype flag (a config name is accepted too)."""
    name = FLAG_NAMES.get(flag, flag)
    if name not in NUMPY or next(f for f, n in FLAG_NAMES.items() if n == name) not in allowed:
        raise ValueError(f"dtype {flag!r}: expected one of {sorted(allowed)}")
    return name
