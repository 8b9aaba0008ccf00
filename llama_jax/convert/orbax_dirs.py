"""Our checkpoints on disk: a params-only directory, or the params of a training run's latest step.

Params-only directory (written by `convert --to orbax`, read by `init_from=` and evaluation):
    DIR/model.yaml                  the ModelConfig mapping
    DIR/params/                     orbax StandardCheckpointer of the pure-dict params, stored in
                                    chunks one `embed` index thick (`storage_shard_axes`)
    DIR/tokenizer.model|.json       optional
Run directory (written by the trainer): RUN/config.yaml (its `model:` key is the ModelConfig mapping),
RUN/checkpoints/<step>/params (an orbax CheckpointManager item), RUN/tokenizer.model|.json.

Every load checks the stored names and shapes against the config before reading any array, so a
checkpoint of another model fails with the parameter's name and both shapes instead of deep in orbax.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import yaml

from llama_jax.model.config import ModelConfig
from llama_jax.model.lora import LoraConfig
from llama_jax.utils.config_io import from_dict, load_yaml, to_dict
from llama_jax.model import api
from llama_jax.utils.files import TOKENIZER_FILES, atomic_directory, tokenizer_files
from llama_jax.utils.trees import flatten, unflatten

MODEL_CONFIG_FILE = "model.yaml"
PARAMS_DIR = "params"
RUN_CONFIG_FILE = "config.yaml"
RUN_CHECKPOINT_DIR = "checkpoints"


def is_params_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_CONFIG_FILE).is_file() and (Path(path) / PARAMS_DIR).is_dir()


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_CONFIG_FILE).is_file() and (Path(path) / RUN_CHECKPOINT_DIR).is_dir()


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored with a params directory (`model.yaml`) or a run directory (`config.yaml: model`)."""
    path = Path(path)
    if is_params_dir(path):
        return from_dict(ModelConfig, load_yaml(path / MODEL_CONFIG_FILE))
    if is_run_dir(path):
        run_cfg = load_yaml(path / RUN_CONFIG_FILE)
        if not isinstance(run_cfg.get("model"), dict):
            raise ValueError(f"{path / RUN_CONFIG_FILE}: no `model:` mapping (the run's ModelConfig)")
        return from_dict(ModelConfig, run_cfg["model"], prefix="model.")
    raise FileNotFoundError(f"{path}: neither a params directory ({MODEL_CONFIG_FILE} + {PARAMS_DIR}/) "
                            f"nor a run directory ({RUN_CONFIG_FILE} + {RUN_CHECKPOINT_DIR}/)")


def read_lora(path: str | os.PathLike) -> tuple[LoraConfig, Path] | None:
    """(adapter config, base checkpoint) of a LoRA run directory, whose checkpoints hold only adapters;
    None for anything else. The base is the run's `init_from`, as written (relative to the current
    directory, as it was for training)."""
    path = Path(path)
    if not is_run_dir(path):
        return None
    run_cfg = load_yaml(path / RUN_CONFIG_FILE)
    lora = from_dict(LoraConfig, run_cfg.get("lora") or {}, prefix="lora.")
    if not lora.enabled:
        return None
    base = Path(str(run_cfg.get("init_from") or "")).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"{path}: LoRA run whose base checkpoint (init_from) {base} is not a directory here")
    return lora, base


def find_tokenizer(path: str | os.PathLike) -> str | None:
    """The tokenizer file that travels with a checkpoint directory, if any."""
    found = tokenizer_files(path)
    return str(found[0]) if found else None


@contextlib.contextmanager
def _without_orbax_warnings():
    """Silence absl's WARNING lines while reading: orbax logs four for every read-only look at a run
    directory (read-only options it adjusts, an item directory without step-level metadata), all
    expected here and alarming in `eval.py`'s output. Errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def params_item_path(path: str | os.PathLike) -> Path:
    """The orbax directory holding the params: DIR/params, or RUN/checkpoints/<latest complete step>/params.

    Always absolute: orbax 0.12.8 returns no item metadata for a relative item path.
    """
    path = Path(path).absolute()
    if is_params_dir(path):
        return path / PARAMS_DIR
    if is_run_dir(path):
        import orbax.checkpoint as ocp

        with _without_orbax_warnings():
            manager = ocp.CheckpointManager(path / RUN_CHECKPOINT_DIR,
                                            options=ocp.CheckpointManagerOptions(read_only=True))
            step = manager.latest_step()
            manager.close()
        if step is None:
            raise FileNotFoundError(f"{path / RUN_CHECKPOINT_DIR}: no complete checkpoint step")
        item = path / RUN_CHECKPOINT_DIR / str(step) / PARAMS_DIR
        if not item.is_dir():
            raise FileNotFoundError(f"{item}: step {step} has no `{PARAMS_DIR}` item")
        return item
    raise FileNotFoundError(f"{path}: neither a params directory nor a run directory")


def stored_param_metadata(item: Path) -> dict[tuple[str, ...], object]:
    """{path: orbax ArrayMetadata (shape, dtype)} of a params item, read without loading any array."""
    import orbax.checkpoint as ocp

    with _without_orbax_warnings():
        tree = ocp.StandardCheckpointer().metadata(item).item_metadata.tree
    return flatten(tree)


def restore_numpy(item: Path, paths: Iterable[tuple[str, ...]]) -> dict:
    """The named parameters of a params item as numpy arrays in their stored dtype (others not read)."""
    import orbax.checkpoint as ocp

    paths = list(paths)
    args = ocp.args.PyTreeRestore(item=unflatten({p: 0 for p in paths}), partial_restore=True,
                                  restore_args=unflatten({p: ocp.RestoreArgs(restore_type=np.ndarray)
                                                           for p in paths}))
    return ocp.PyTreeCheckpointer().restore(item, args=args)


def load_params(path: str | os.PathLike, model_cfg: ModelConfig, shardings=None) -> dict:
    """The params of a params dir or run dir as a pure dict, checked against `model_cfg` first.

    Without `shardings` the arrays come back as numpy in `model_cfg.param_dtype`; with a pure-dict tree
    of `jax.sharding.Sharding` they come back as jax arrays laid out that way, read one parameter and
    one device shard at a time: beyond its own share a host holds one shard and the stored chunks that
    shard overlaps (one `embed` index thick in a params dir; the writer's shards in a run checkpoint;
    the whole parameter in a params dir written before chunking, which still loads).
    """
    item = params_item_path(path)
    stored = stored_param_metadata(item)
    api.check_param_shapes({p: m.shape for p, m in stored.items()}, model_cfg, str(item))
    dtype = model_cfg.weight_dtype
    if shardings is None:
        flat = flatten(restore_numpy(item, stored))
        return unflatten({p: np.asarray(v).astype(dtype, copy=False) for p, v in flat.items()})
    flat_shardings = flatten(shardings)
    with _without_orbax_warnings():
        stores = stored_arrays(item)
        return unflatten({p: _read_into_shards(stores(p), flat_shardings[p], dtype) for p in stored})


def stored_arrays(item: Path):
    """A function from a parameter path to the opened TensorStore of its stored array in `item`.

    Orbax's own spec for each array (OCDBT or not, zarr 2 or 3 as the item's metadata records), in
    one TensorStore context shared by all of them: orbax's, which caches only OCDBT B-tree nodes
    (bounded), never array data."""
    import orbax.checkpoint as ocp
    import tensorstore as ts

    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(item)
    metadata = item / "_METADATA"  # orbax's tree metadata; zarr 2 when it does not say
    use_zarr3 = metadata.is_file() and bool(json.loads(metadata.read_text()).get("use_zarr3", False))
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)

    def store(path: tuple[str, ...]):
        info = ocp.type_handlers.ParamInfo(name=".".join(path), parent_dir=item, use_zarr3=use_zarr3,
                                           ts_context=context)
        return ts.open(ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt), open=True,
                       context=context).result()
    return store


def _read_into_shards(store, sharding, dtype) -> jax.Array:
    """One stored array as a jax array laid out by `sharding`, read one device shard at a time.

    Each distinct shard this process's devices hold is read (only the stored chunks it overlaps),
    cast, placed on its devices and dropped before the next is read; orbax's own restore reads all
    shards of an array at once and keeps every host copy until all are placed, twice the array's share.
    """
    import jax

    shape = tuple(store.shape)
    by_index = collections.defaultdict(list)
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        by_index[tuple((s.indices(n)[:2]) for s, n in zip(index, shape))].append(device)
    arrays = []
    for bounds, devices in by_index.items():
        host = store[tuple(slice(*b) for b in bounds)].read().result().astype(dtype, copy=False)
        arrays += [jax.device_put(host, device).block_until_ready() for device in devices]
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


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
    if Path(path).exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    with atomic_directory(path) as tmp:
        write_params_dir(tmp, params, model_cfg, tokenizer_path)


def storage_shard_axes(model_cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: its `embed` axes}: the axes a params dir stores in chunks one index thick.

    Orbax stores an array written from one process as a single compressed chunk, and a chunk is read
    and decoded whole: a host loading its fsdp shard (a slice along `embed`) would decode every
    parameter whole, once per device. Chunks one `embed` index thick (orbax's `shard_axes`) line up
    with the fsdp slices of any mesh, so each host reads only the chunks its shards hold.
    """
    return {p: tuple(i for i, name in enumerate(names) if name == "embed")
            for p, names in flatten(api.param_axes(model_cfg)).items()}


def write_model_config(directory: Path, model_cfg: ModelConfig) -> None:
    (directory / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(model_cfg), sort_keys=False))


def write_params_dir(directory: Path, params: Mapping, model_cfg: ModelConfig,
                     tokenizer_path: str | os.PathLike | None) -> None:
    """The files of a params-only checkpoint inside an existing (temporary) directory."""
    import orbax.checkpoint as ocp

    write_model_config(directory, model_cfg)
    axes = storage_shard_axes(model_cfg)
    save_args = unflatten({p: ocp.SaveArgs(shard_axes=axes[p]) for p in flatten(params)})
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).absolute() / PARAMS_DIR, dict(params), save_args=save_args)
    checkpointer.wait_until_finished()
    if tokenizer_path is not None:
        name = Path(tokenizer_path).name
        if name not in TOKENIZER_FILES:
            raise ValueError(f"tokenizer {tokenizer_path}: expected a file named one of {TOKENIZER_FILES}")
        shutil.copyfile(tokenizer_path, directory / name)
