"""The floating-point types llama_jax stores and computes in: one table of names, for configs and flags alike.

Every place that takes a dtype (a config's `dtype` / `param_dtype` / `lora.base_dtype`, `eval --dtype`,
`convert --dtype`, their `key=value` overrides) accepts the same spellings: the canonical name (numpy's
and jax's own, what configs are written with) or its short alias. Values are stored canonical, so a
config read with `dtype: bf16` equals one read with `dtype: bfloat16`. numpy has no bfloat16:
`ml_dtypes.bfloat16` is the one jax and the converters share, so the table serves jax and numpy alike.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from llama_jax.utils.config_io import ConfigError

# canonical name -> (numpy dtype, alias)
TABLE = {
    "float32": (np.dtype(np.float32), "fp32"),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "bf16"),
    "float16": (np.dtype(np.float16), "fp16"),
}
NAMES = tuple(TABLE)
ALIASES = {alias: name for name, (_, alias) in TABLE.items()}


def spellings(allowed: tuple[str, ...] = NAMES) -> tuple[str, ...]:
    """Every accepted spelling of the `allowed` canonical names: the names, then their aliases."""
    return (*allowed, *(TABLE[name][1] for name in allowed))


def canonical(name, key: str = "dtype", allowed: tuple[str, ...] = NAMES) -> str:
    """The canonical name of `name` (a canonical name or an alias), else a ConfigError naming `key`,
    the value and every accepted spelling."""
    resolved = ALIASES.get(name, name) if isinstance(name, str) else None
    if resolved not in allowed:
        aliases = ", ".join(TABLE[n][1] for n in allowed)
        raise ConfigError(f"{key}={name!r}; expected one of {', '.join(allowed)} (or {aliases})")
    return resolved


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of any accepted spelling."""
    return TABLE[canonical(name)][0]


def config_name(dtype) -> str | None:
    """The canonical name of one of the supported numpy dtypes, else None."""
    return next((name for name, (d, _) in TABLE.items() if d == np.dtype(dtype)), None)
