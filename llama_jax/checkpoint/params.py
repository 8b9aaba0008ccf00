"""The params of a params directory or of a run's newest verified step: read whole or straight into shards,
and params directories written.

Nothing is read unverified. A params directory's files are compared with its integrity record first
(`integrity.json`, written with them); a difference is `CheckpointDamaged` naming the file. A run
directory gives its newest step whose files match their record; newer steps that do not (damaged, or
without a record: saved by a job killed before recording it) are passed over with one warning line
naming them and why. Every value read is also checked to be finite (NaN or inf is damage, named by
parameter), which is the only check left for a params directory written before records existed.
Every load checks the stored names and shapes against the config before reading any array, so a
checkpoint of another model fails with the parameter's name and both shapes instead of deep in orbax.
"""
from __future__ import annotations

import collections
import os
import shutil
import sys
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from llama_jax.checkpoint import integrity, orbax_io
from llama_jax.checkpoint.integrity import CheckpointDamaged
from llama_jax.checkpoint.layout import (PARAMS_DIR, PARAMS_RECORD, RUN_CHECKPOINT_DIR, is_params_dir, is_run_dir,
                                         step_record, write_model_config)
from llama_jax.model import api
from llama_jax.model.config import ModelConfig
from llama_jax.utils.files import TOKENIZER_FILES, atomic_directory
from llama_jax.utils.trees import flatten, unflatten

stored_param_metadata = orbax_io.stored_param_metadata
restore_numpy = orbax_io.restore_numpy


def _warn(line: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {line}", file=sys.stderr, flush=True)


def verified_params_item(path: str | os.PathLike) -> Path:
    """The verified orbax directory holding the params: DIR/params, or RUN/checkpoints/<newest verified
    step>/params (see the module's docstring).

    Always absolute: orbax 0.12.8 returns no item metadata for a relative item path.
    """
    path = Path(path).absolute()
    if is_params_dir(path):
        record = path / PARAMS_RECORD
        if not record.is_file():
            _warn(f"{path} has no {PARAMS_RECORD} (written before llama_jax recorded one): only checking that "
                  f"its values are finite")
        elif problem := integrity.damage(record, path):
            raise CheckpointDamaged(f"{path}: damaged: {problem}")
        return path / PARAMS_DIR
    if is_run_dir(path):
        steps = orbax_io.committed_steps(path / RUN_CHECKPOINT_DIR)
        if not steps:
            raise FileNotFoundError(f"{path / RUN_CHECKPOINT_DIR}: no complete checkpoint step")
        passed = []
        for step in reversed(steps):
            if problem := integrity.damage(step_record(path, step), path / RUN_CHECKPOINT_DIR / str(step)):
                passed.append(f"step {step} ({problem})")
                continue
            item = path / RUN_CHECKPOINT_DIR / str(step) / PARAMS_DIR
            if not item.is_dir():
                raise FileNotFoundError(f"{item}: step {step} has no `{PARAMS_DIR}` item")
            if passed:
                _warn(f"{path}: reading step {step}, the newest verified one; passed over {'; '.join(passed)}")
            return item
        raise CheckpointDamaged(f"{path / RUN_CHECKPOINT_DIR}: no verified step: {'; '.join(passed)}")
    raise FileNotFoundError(f"{path}: neither a params directory nor a run directory")


def restore_checked(item: Path, paths) -> dict:
    """`restore_numpy` of the named parameters, each checked finite."""
    restored = flatten(restore_numpy(item, paths))
    for p, v in restored.items():
        check_finite(v, f"{item}: parameter {'.'.join(p)}")
    return unflatten(restored)


def check_finite(array: np.ndarray, what: str) -> None:
    """CheckpointDamaged when `array` holds NaN or inf (checked in slices: no full-size temporary)."""
    flat = np.asarray(array).reshape(-1)
    step = 1 << 22
    for start in range(0, flat.size, step):
        if not np.isfinite(flat[start:start + step]).all():
            raise CheckpointDamaged(f"{what} holds NaN or inf: the checkpoint is damaged")


def load_params(path: str | os.PathLike, model_cfg: ModelConfig, shardings=None) -> dict:
    """The params of a params dir or run dir as a pure dict, checked against `model_cfg` first.

    Without `shardings` the arrays come back as numpy in `model_cfg.param_dtype`; with a pure-dict tree
    of `jax.sharding.Sharding` they come back as jax arrays laid out that way, read one parameter and
    one device shard at a time: beyond its own share a host holds one shard and the stored chunks that
    shard overlaps (one `embed` index thick in a params dir; the writer's shards in a run checkpoint;
    the whole parameter in a params dir written before chunking, which still loads).
    """
    item = verified_params_item(path)
    stored = stored_param_metadata(item)
    api.check_param_shapes({p: m.shape for p, m in stored.items()}, model_cfg, str(item))
    dtype = model_cfg.weight_dtype
    if shardings is None:
        flat = flatten(restore_checked(item, stored))
        return unflatten({p: np.asarray(v).astype(dtype, copy=False) for p, v in flat.items()})
    flat_shardings = flatten(shardings)
    with orbax_io.without_orbax_warnings():
        stores = orbax_io.stored_arrays(item)
        return unflatten({p: _read_into_shards(stores(p), flat_shardings[p], dtype, f"{item}: parameter {'.'.join(p)}")
                          for p in stored})


def _read_into_shards(store, sharding, dtype, what: str) -> jax.Array:
    """One stored array as a jax array laid out by `sharding`, read one device shard at a time.

    Each distinct shard this process's devices hold is read (only the stored chunks it overlaps),
    cast, placed on its devices and dropped before the next is read; orbax's own restore reads all
    shards of an array at once and keeps every host copy until all are placed, twice the array's share.
    """
    shape = tuple(store.shape)
    by_index = collections.defaultdict(list)
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        by_index[tuple((s.indices(n)[:2]) for s, n in zip(index, shape))].append(device)
    arrays = []
    for bounds, devices in by_index.items():
        host = store[tuple(slice(*b) for b in bounds)].read().result()
        check_finite(host, what)
        host = host.astype(dtype, copy=False)
        arrays += [jax.device_put(host, device).block_until_ready() for device in devices]
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def storage_shard_axes(model_cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: its `embed` axes}: the axes a params dir stores in chunks one index thick.

    Orbax stores an array written from one process as a single compressed chunk, and a chunk is read
    and decoded whole: a host loading its fsdp shard (a slice along `embed`) would decode every
    parameter whole, once per device. Chunks one `embed` index thick (orbax's `shard_axes`) line up
    with the fsdp slices of any mesh, so each host reads only the chunks its shards hold.
    """
    return {p: tuple(i for i, name in enumerate(names) if name == "embed")
            for p, names in flatten(api.param_axes(model_cfg)).items()}


class ParamsDirWriter:
    """Writes a params directory's files into an existing (temporary) directory, one parameter at a time:
    `add` each parameter (it can be dropped once added), then `finish` (model.yaml last)."""

    def __init__(self, directory: Path, model_cfg: ModelConfig):
        self.directory = Path(directory).absolute()  # orbax refuses a relative destination (`--to orbax DST`)
        self.cfg = model_cfg
        self._item = orbax_io.ParamsItemWriter(self.directory / PARAMS_DIR, storage_shard_axes(model_cfg))

    def add(self, path: tuple[str, ...], value: np.ndarray) -> None:
        self._item.add(path, value)

    def finish(self) -> None:
        self._item.finish()
        integrity.write_record(self.directory / PARAMS_RECORD, self.directory, PARAMS_DIR)
        write_model_config(self.directory, self.cfg)


def save_params(path: str | os.PathLike, params: Mapping, model_cfg: ModelConfig,
                tokenizer_path: str | os.PathLike | None = None) -> None:
    """Write a params-only checkpoint at `path` atomically (a temporary sibling renamed at the end).

    Refuses to overwrite; checks names and shapes against `model_cfg` and that every array is stored in
    `model_cfg.param_dtype`, so that `load_params(path, read_model_config(path))` always succeeds.
    """
    flat = flatten(params)
    api.check_param_shapes({p: tuple(np.shape(v)) for p, v in flat.items()}, model_cfg, "params to save")
    for p, v in flat.items():
        if np.dtype(v.dtype) != np.dtype(model_cfg.weight_dtype):
            raise ValueError(f"params to save: parameter {'.'.join(p)} is {np.dtype(v.dtype)}, "
                             f"the config's param_dtype is {model_cfg.param_dtype}")
    if tokenizer_path is not None and Path(tokenizer_path).name not in TOKENIZER_FILES:
        raise ValueError(f"tokenizer {tokenizer_path}: expected a file named one of {TOKENIZER_FILES}")
    if Path(path).exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    with atomic_directory(path) as tmp:
        writer = ParamsDirWriter(tmp, model_cfg)
        for p, v in flat.items():
            writer.add(p, np.asarray(v))
        writer.finish()
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / Path(tokenizer_path).name)
