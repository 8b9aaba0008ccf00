"""One conversion: open and validate the source, plan the target, stream tensor by tensor, commit.

The tokenizer and the files that make the target the same chat model (`companions`: tokenizer config,
chat template, generation config, BOS/EOS/pad ids) travel with the weights.

Everything that can be checked (every name, shape and dtype in the source, the target's splits and
config form) is checked before the first byte is written; the target is written into a temporary
sibling of DST and renamed at the end, so a failed conversion leaves no DST behind.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from llama_jax.model.config import ModelConfig, load_model_config
from llama_jax.convert import companions
from llama_jax.convert.common import FORMATS, ConvertError, tensor_count, tensor_items
from llama_jax.convert.hf import DEFAULT_SHARD_BYTES, HFReader, HFWriter, is_hf_dir
from llama_jax.convert.meta import MetaReader, MetaWriter, is_meta_dir
from llama_jax.convert.ours import OrbaxReader, OrbaxWriter, ParamTreeBuilder, is_orbax_dir
from llama_jax.utils import dtypes
from llama_jax.utils.config_io import ConfigError
from llama_jax.utils.extras import require
from llama_jax.utils.files import atomic_directory

READERS = {"meta": MetaReader, "hf": HFReader, "orbax": OrbaxReader}


def detect_format(path: str | os.PathLike) -> str:
    """"meta", "hf" or "orbax" from the files in `path`."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path}: not a directory")
    if is_meta_dir(path):
        return "meta"
    if is_orbax_dir(path):
        return "orbax"
    if is_hf_dir(path):
        return "hf"
    raise ConvertError(f"{path}: not a Meta (params.json + consolidated.NN.pth), Hugging Face (config.json) "
                       f"or llama_jax (model.yaml + params/, or a run directory) checkpoint")


def open_reader(path: str | os.PathLike, fmt: str | None = None, preset: str | None = None):
    """A validated reader of the checkpoint at `path`; `preset` supplies what the format does not record."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not path.is_dir():
        raise ConvertError(f"{path}: not a directory")
    if fmt == "meta":
        require("torch", "reading a Meta checkpoint (.pth)")
    base = load_model_config(preset) if preset else ModelConfig()
    reader = READERS[fmt](path, base)
    if preset:  # the sizes the weights fix must agree; a tied head is the source's to say (Meta's files hold one)
        found = reader.cfg.weight_sizes()
        for size, value in base.weight_sizes().items():
            if value != found[size]:
                raise ConvertError(f"--preset {preset} has {size}={value}, but {path} has {found[size]}")
    return reader


def read_checkpoint(path: str | os.PathLike, fmt: str | None = None) -> tuple[ModelConfig, dict, str | None]:
    """(ModelConfig, our pure-dict params as numpy, tokenizer path or None) of any supported checkpoint.

    Nothing is written; the config's param_dtype is the dtype the weights are stored in.
    """
    reader = open_reader(path, fmt)
    builder = ParamTreeBuilder(reader.cfg, reader.dtype)
    for tmap, layer in tensor_items(reader.cfg):
        builder.add(tmap, layer, reader.tensor(tmap, layer))
    reader.close()
    tokenizer = str(reader.tokenizer_files[0]) if reader.tokenizer_files else None
    return builder.cfg, builder.params, tokenizer


def make_writer(fmt: str, directory: Path, cfg: ModelConfig, dtype: np.dtype, *, model_parallel: int = 1,
                meta_embedding_split_dim: int | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                token_ids: dict | None = None):
    if fmt == "meta":
        return MetaWriter(directory, cfg, dtype, model_parallel, meta_embedding_split_dim)
    if model_parallel != 1:
        raise ConvertError(f"--model-parallel applies to --to meta only (got {model_parallel} for {fmt})")
    if fmt == "hf":
        return HFWriter(directory, cfg, dtype, max_shard_bytes, token_ids)
    if fmt == "orbax":
        return OrbaxWriter(directory, cfg, dtype)
    raise ConvertError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, src_format: str | None = None,
            dtype: str | None = None, model_parallel: int = 1, preset: str | None = None,
            meta_embedding_split_dim: int | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            progress: bool = True) -> ModelConfig:
    """Convert the checkpoint at `src` into format `to` at `dst` (which must not exist); returns the config.

    `dtype` (any spelling of `llama_jax.utils.dtypes`: "bfloat16" or "bf16", ...) casts every tensor; by
    default the source's dtype is kept.
    """
    from tqdm import tqdm

    if Path(dst).exists():
        raise ConvertError(f"{dst} already exists; refusing to overwrite it")
    try:
        target_name = None if dtype is None else dtypes.canonical(dtype, "--dtype")
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    if to == "meta":
        require("torch", "writing a Meta checkpoint (.pth)")
    reader = open_reader(src, src_format, preset)
    target_dtype = dtypes.numpy_dtype(target_name) if target_name else reader.dtype
    try:
        tokenizer = reader.tokenizer_files[0] if reader.tokenizer_files else None
        token_ids = companions.source_token_ids(reader.source_dirs, tokenizer)
        with atomic_directory(dst, "convert-tmp") as tmp:
            writer = make_writer(to, tmp, reader.cfg, target_dtype, model_parallel=model_parallel,
                                 meta_embedding_split_dim=meta_embedding_split_dim, max_shard_bytes=max_shard_bytes,
                                 token_ids=token_ids)
            with tqdm(total=tensor_count(reader.cfg), unit="tensor", desc=f"{reader.fmt} -> {to}",
                      disable=not progress) as bar:
                for tmap, layer in tensor_items(reader.cfg):
                    writer.add(tmap, layer, reader.tensor(tmap, layer))
                    bar.update()
            writer.finish()
            for file in reader.tokenizer_files:
                shutil.copyfile(file, tmp / file.name)
            companions.carry(tmp, tokenizer_dirs=[f.parent for f in reader.tokenizer_files[:1]],
                             model_dirs=reader.source_dirs, token_ids=token_ids, hf_target=to == "hf")
    finally:
        reader.close()
    return reader.cfg
