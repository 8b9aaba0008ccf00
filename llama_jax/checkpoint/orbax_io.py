"""Every use of orbax and TensorStore in the package: the one place that knows their APIs and internals.

Written against orbax-checkpoint's range pinned in pyproject.toml (the tests run on its lower bound).
Everything is written through one API, orbax v1 (`orbax.checkpoint.v1`): a run's steps with its
`training.Checkpointer` (`RunManager`), params directories one parameter at a time with its partial
saving (`ParamsItemWriter`), so that a conversion never holds more than one stacked parameter group.
Reading uses orbax's v0 surface (metadata, restore as numpy, a read-only step listing) and, beyond it,
`stored_arrays` opens a stored array with orbax's own TensorStore spec (`type_handlers`), so a host
reads only the chunks of its shards.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import orbax.checkpoint as ocp

from llama_jax.utils.trees import flatten, unflatten


class _BelowErrorOnThisThread(logging.Filter):
    """Drops the records below ERROR logged by the thread that made it."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.thread != self.thread


@contextlib.contextmanager
def without_orbax_warnings():
    """Silence absl's WARNING lines of this thread while it reads: orbax logs four for every read-only
    look at a run directory (read-only options it adjusts, an item directory without step-level
    metadata), all expected here and alarming in `eval.py`'s output. Errors still show, and so does
    whatever other threads log meanwhile (a training run's checkpoint saves)."""
    logger, mute = logging.getLogger("absl"), _BelowErrorOnThisThread()
    logger.addFilter(mute)
    try:
        yield
    finally:
        logger.removeFilter(mute)


class RunManager:
    """The (params, opt_state, meta) steps of a run's `checkpoints/` directory through orbax's v1
    `training.Checkpointer` (the API that also writes params directories, `ParamsItemWriter`).

    `on_committed(step)` runs as soon as the save of `step` is committed (in the background thread
    that waits for it: `AsyncResponse.on_complete`); `wait` returns only after it has run, and raises
    what it raised, so a step is never reported saved before it is recorded.
    """

    def __init__(self, directory: Path, *, keep: int, keep_period: int = 0, async_save: bool = True,
                 on_committed: Callable[[int], None] | None = None):
        from orbax.checkpoint import v1

        policies = v1.training.preservation_policies
        keeps = [policies.LatestN(keep)] + ([policies.EveryNSteps(keep_period)] if keep_period else [])
        registry = v1.handlers.local_registry()
        registry.add(v1.handlers.JsonHandler, checkpointable_name="meta")  # else a dict is saved as a pytree
        self._context = v1.Context()
        self._context.checkpointables.registry = registry
        self._checkpointer = v1.training.Checkpointer(
            directory, context=self._context, preservation_policy=policies.AnyPreservationPolicy(keeps),
            cleanup_tmp_directories=True)
        self._async = async_save
        self._on_committed = on_committed
        self._pending = None  # (orbax's response, event set once on_committed ran, [its exception])

    def steps(self) -> list[int]:
        """Every complete step, oldest first."""
        return [c.step for c in self._checkpointer.checkpoints]

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        import threading

        response = self._checkpointer.save_checkpointables_async(
            step, {"params": params, "opt_state": opt_state, "meta": meta}, force=True)
        recorded, failure = threading.Event(), []

        def committed(_saved: bool) -> None:
            try:
                if self._on_committed is not None:
                    self._on_committed(step)
            except BaseException as e:  # noqa: BLE001  (raised again by `wait`, in the caller's thread)
                failure.append(e)
            finally:
                recorded.set()

        response.on_complete(committed)  # called only when the save succeeded
        self._pending = (response, recorded, failure)
        if not self._async:
            self.wait()

    def restore(self, step: int, target_params: Any, target_opt_state: Any) -> tuple[Any, Any]:
        restored = self._checkpointer.load_checkpointables(
            step, {"params": target_params, "opt_state": target_opt_state})
        return restored["params"], restored["opt_state"]

    def param_metadata(self, step: int) -> dict:
        return self._checkpointer.checkpointables_metadata(step).metadata["params"]

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            response, recorded, failure = pending
            response.result()  # raises the save's failure
            recorded.wait()
            if failure:
                raise failure[0]
        self._checkpointer.wait()

    def close(self) -> None:
        self._checkpointer.close()


def committed_steps(directory: Path) -> list[int]:
    """Every complete step of a run's `checkpoints/` directory, oldest first, looked at read-only
    (nothing created or cleaned up, no barrier between processes)."""
    with without_orbax_warnings():
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            return sorted(manager.all_steps())
        finally:
            manager.close()


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
        context = v1.Context()
        context.array.saving.storage_options = v1.options.ArrayOptions.Saving.StorageOptions(
            shard_axes=self._shard_axes[path])
        with context:
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
