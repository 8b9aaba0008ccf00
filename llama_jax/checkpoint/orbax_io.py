"""Every use of orbax and TensorStore in the package: the one place that knows their APIs and internals.

Written against orbax-checkpoint's range pinned in pyproject.toml (the tests run on its lower bound). Two
parts of orbax are used beyond its stable v0 surface, both here alone:

- `_RecordingManager` overrides `CheckpointManager._finalize_checkpoint`, which orbax calls once a step
  is committed (renamed into place), in its finalize thread, before `wait_until_finished` returns: the
  hook where a step's integrity record is written as soon as the step is durable;
- `stored_arrays` opens a stored array with orbax's own TensorStore spec (`type_handlers`), so a host
  reads only the chunks of its shards.

Params directories are written one parameter at a time with orbax's partial saving (`ParamsItemWriter`),
so that a conversion never holds more than one stacked parameter group.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import orbax.checkpoint as ocp

from llama_jax.utils.trees import flatten, unflatten

RUN_ITEMS = ("params", "opt_state", "meta")


@contextlib.contextmanager
def without_orbax_warnings():
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


class _RecordingManager(ocp.CheckpointManager):
    """orbax's CheckpointManager that calls `on_committed(step)` as soon as a save of `step` is committed."""

    def __init__(self, *args, on_committed: Callable[[int], None] | None = None, **kwargs):
        self._on_committed = on_committed
        super().__init__(*args, **kwargs)

    def _finalize_checkpoint(self, step: int):
        # orbax reaches here only after every write and the rename into place succeeded (a failure raises
        # before); it then only logs errors it finds, so the step directory's presence is checked too.
        super()._finalize_checkpoint(step)
        if self._on_committed is not None and (Path(self.directory) / str(step)).is_dir():
            self._on_committed(step)


class RunManager:
    """The (params, opt_state, meta) steps of a run's `checkpoints/` directory through orbax."""

    def __init__(self, directory: Path, *, keep: int | None = None, keep_period: int = 0, async_save: bool = True,
                 read_only: bool = False, on_committed: Callable[[int], None] | None = None):
        self._quiet = without_orbax_warnings if read_only else contextlib.nullcontext
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        with self._quiet():
            if read_only:
                options = ocp.CheckpointManagerOptions(read_only=True)
            else:
                options = ocp.CheckpointManagerOptions(
                    max_to_keep=keep, keep_period=keep_period or None, enable_async_checkpointing=async_save,
                    cleanup_tmp_directories=True, create=True)
            self._manager = _RecordingManager(directory, options=options, item_handlers=handlers,
                                              on_committed=on_committed)

    def steps(self) -> list[int]:
        """Every complete step, oldest first."""
        with self._quiet():
            return sorted(self._manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, target_params: Any, target_opt_state: Any) -> tuple[Any, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target_params), opt_state=ocp.args.StandardRestore(target_opt_state)))
        return restored["params"], restored["opt_state"]

    def param_metadata(self, step: int) -> dict:
        return self._manager.item_metadata(step)["params"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        with self._quiet():
            self._manager.close()


def stored_param_metadata(item: Path) -> dict[tuple[str, ...], object]:
    """{path: orbax ArrayMetadata (shape, dtype)} of a params item, read without loading any array."""
    with without_orbax_warnings():
        tree = ocp.StandardCheckpointer().metadata(item).item_metadata.tree
    return flatten(tree)


def restore_numpy(item: Path, paths: Iterable[tuple[str, ...]]) -> dict:
    """The named parameters of a params item as numpy arrays in their stored dtype (others not read)."""
    paths = list(paths)
    args = ocp.args.PyTreeRestore(item=unflatten({p: 0 for p in paths}), partial_restore=True,
                                  restore_args=unflatten({p: ocp.RestoreArgs(restore_type=np.ndarray)
                                                           for p in paths}))
    return ocp.PyTreeCheckpointer().restore(item, args=args)


def stored_arrays(item: Path):
    """A function from a parameter path to the opened TensorStore of its stored array in `item`.

    Orbax's own spec for each array (OCDBT or not, zarr 2 or 3 as the item's metadata records), in
    one TensorStore context shared by all of them: orbax's, which caches only OCDBT B-tree nodes
    (bounded), never array data."""
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


class ParamsItemWriter:
    """Writes the params item of a params directory one parameter at a time, stored in chunks one index
    thick along each parameter's `shard_axes`.

    Each parameter is saved as soon as it is given (orbax's partial saving) and can then be dropped, so
    a writer never holds more than one parameter; `finish` merges the partial saves into one pytree at
    `item`, which restores like any StandardCheckpointer save. Parameters go to orbax as host-CPU jax
    arrays over the caller's buffer (no copy), which it writes without the staging copy it makes of
    numpy leaves.
    """

    PARTIAL_DIR = "partial_params"  # orbax's finalize skips pending saves of a dot-named directory
    PARTIAL_ITEM = "state"  # where orbax's partial saving puts the pytree inside its checkpoint

    def __init__(self, item: Path, shard_axes: dict[tuple[str, ...], tuple[int, ...]]):
        self.item = Path(item).absolute()
        self._partial = self.item.parent / self.PARTIAL_DIR
        self._shard_axes = shard_axes

    def add(self, path: tuple[str, ...], value: np.ndarray) -> None:
        import jax
        from orbax.checkpoint import v1
        from orbax.checkpoint.experimental.v1 import partial

        array = jax.device_put(value, jax.devices("cpu")[0], may_alias=True)
        saving = v1.options.ArrayOptions.Saving
        storage = saving.StorageOptions(shard_axes=self._shard_axes[path])
        with v1.Context(array_options=v1.options.ArrayOptions(saving=saving(storage_options=storage))):
            partial.save(self._partial, unflatten({path: array}))

    def finish(self) -> None:
        import shutil

        from orbax.checkpoint.experimental.v1 import partial

        partial.finalize(self._partial)
        merged = self._partial / self.PARTIAL_ITEM
        if not merged.is_dir():
            raise RuntimeError(f"{merged}: orbax's partial save left no pytree there")
        merged.rename(self.item)
        shutil.rmtree(self._partial)
