"""A training run's checkpoints: orbax CheckpointManager under `RUN/checkpoints/`, one step per directory.

Each step directory holds three items: `params` (the model's pure dict), `opt_state` (optax state, same
tree as the parameters it mirrors) and `meta` (JSON: step, data-iterator state, seed). Every process
calls `save` and `restore` (orbax writes and reads each process's shards cooperatively); saves are
asynchronous, so training continues while the arrays are written.

Crash safety is orbax's: a step is written into a temporary directory and renamed (or, on object
stores, marked committed) only when complete, so a process killed mid-save leaves at worst an
unfinished temporary directory, which `latest_step` ignores and the next start deletes.

Restoring takes the target tree of `jax.ShapeDtypeStruct`s with shardings: the arrays are read directly
into that layout, whatever mesh wrote them (resharding on restore). `param_shapes` reads the saved
shapes from the metadata alone, so the caller can compare them with the config before anything is
read or compiled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from llama_jax.utils.trees import flatten


class RunCheckpoints:
    """Save and restore (params, opt_state, meta) of a run; keeps the last `keep` steps plus milestones."""

    def __init__(self, run_dir: str | Path, *, keep: int, keep_period: int = 0, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period or None, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Start saving `step` (returns once the arrays are copied off; writing continues in the background)."""
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def param_shapes(self, step: int) -> dict[tuple[str, ...], tuple[int, ...]]:
        """{parameter path: shape} saved at `step`, read from the metadata only (no array is read)."""
        return {path: tuple(meta.shape) for path, meta in flatten(self._manager.item_metadata(step)["params"]).items()}

    def restore(self, step: int, target_params: Any, target_opt_state: Any) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of `step`, read into the targets' shapes, dtypes and shardings."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target_params), opt_state=ocp.args.StandardRestore(target_opt_state),
            meta=ocp.args.JsonRestore()))
        return restored["params"], restored["opt_state"], dict(restored["meta"])

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying the matching sharding: a restore target on any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
