"""The options of `llama-jax-convert`, one frozen dataclass validated once when built.

Built like every config (`llama_jax.utils.config_io.from_dict`) from the command line's flags (generated
from these fields by `llama_jax.cli.options`) and `key=value` overrides (`dtype=bfloat16`,
`max_shard_size=500MiB`); `convert(**options.convert_kwargs())` runs the conversion.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from llama_jax.convert.common import FORMATS
from llama_jax.convert.hf import DEFAULT_SHARD_BYTES
from llama_jax.utils import dtypes
from llama_jax.utils.config_io import ConfigError, check_choices

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """"5GB", "500MiB" or a plain byte count (a ConfigError otherwise)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise ConfigError(f"max_shard_size={text!r}: not a size (e.g. 5GB, 500MiB, 1000000)")
    size = float(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    if not math.isfinite(size):
        raise ConfigError(f"max_shard_size={text[:40]!r}...: too large")
    return int(size)


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    src: str = field(metadata={"positional": True, "help": "source checkpoint directory"})
    dst: str = field(metadata={"positional": True, "help": "target directory (must not exist)"})
    to: str = field(metadata={"choices": FORMATS, "help": "target format"})
    src_format: str | None = field(default=None, metadata={
        "flag": "--from", "choices": FORMATS, "help": "source format (default: detected from SRC's files)"})
    dtype: str | None = field(default=None, metadata={
        "choices": dtypes.spellings(), "help": "cast every tensor (default: keep the source's)"})
    model_parallel: int = field(default=1, metadata={
        "help": "number of Meta shards to write (--to meta); every split must divide by it"})
    preset: str | None = field(default=None, metadata={
        "help": "model preset supplying what the source does not record (e.g. max_seq_len); its shapes must "
                "match the source's"})
    meta_embedding_split_dim: int | None = field(default=None, metadata={
        "choices": (0, 1), "help": "--to meta: split tok_embeddings by rows (0, LLaMA 3) or columns (1, LLaMA 1/2); "
                                   "default: 0 for LLaMA 3's 128256-token vocabulary, else 1"})
    max_shard_size: int | str = field(default=DEFAULT_SHARD_BYTES, metadata={
        "help": "--to hf: largest safetensors file before sharding with an index, in bytes or with a unit "
                "(5GB, 500MiB; default 5GiB)"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    def __post_init__(self):
        if self.dtype is not None:
            object.__setattr__(self, "dtype", dtypes.canonical(self.dtype))  # stored canonical
        check_choices(self)
        if isinstance(self.max_shard_size, str):
            object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))

    def convert_kwargs(self) -> dict:
        """The arguments of `llama_jax.convert.convert`."""
        return dict(src=self.src, dst=self.dst, to=self.to, src_format=self.src_format, dtype=self.dtype,
                    model_parallel=self.model_parallel, preset=self.preset,
                    meta_embedding_split_dim=self.meta_embedding_split_dim, max_shard_bytes=self.max_shard_size,
                    progress=self.progress)
