"""A training run's checkpoints: orbax CheckpointManager under `RUN/checkpoints/`, one step per directory.

Each step directory holds three items: `params` (the model's pure dict), `opt_state` (optax state, same
tree as the parameters it mirrors) and `meta` (JSON: step, data-iterator state, seed, spike detector;
read back by `checkpoint_meta.read_meta`, which checks every field). Every process
calls `save` and `restore` (orbax writes and reads each process's shards cooperatively); saves are
asynchronous, so training continues while the arrays are written.

Crash safety is orbax's: a step is written into a temporary directory and renamed (or, on object
stores, marked committed) only when complete, so a process killed mid-save leaves at worst an
unfinished temporary directory, which `latest_step` ignores and the next start deletes.

Restoring takes the target tree of `jax.ShapeDtypeStruct`s with shardings: the arrays are read directly
into that layout, whatever mesh wrote them (resharding on restore). `param_shapes` reads the saved
shapes from the metadata alone, so the caller can compare them with the config before anything is
read or compiled.

Damage after the fact (a truncated, zeroed or deleted file) is what orbax cannot see: once a step's save
has finished, process 0 records every file's size and CRC-32 in `RUN/checkpoint_integrity/<step>.json`;
`damage(step)` compares the files with that record (one line naming the first file that differs), and
`set_aside(step)` renames a damaged step to `checkpoints/<step>.corrupt-<time>` (never deleted; orbax
no longer sees it) so that the previous step becomes the latest.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from llama_jax.training.checkpoint_meta import read_meta
from llama_jax.utils.trees import flatten


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, I/O error); one line naming the step, the cause and the intact
    previous step. Raised by `save`, `wait` and `close` once orbax reports the failure."""


def _cause(error: BaseException) -> str:
    """The OSError at the root of `error` ("[Errno 28] No space left on device: 'PATH'"), else its first line."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return str(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:1000] if lines else ''}"


class RunCheckpoints:
    """Save and restore (params, opt_state, meta) of a run; keeps the last `keep` steps plus milestones."""

    def __init__(self, run_dir: str | Path, *, keep: int, keep_period: int = 0, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.integrity_dir = Path(run_dir).absolute() / "checkpoint_integrity"
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period or None, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        self._manager = self._open()
        self._saving: int | None = None  # the step whose save may still be in flight
        self._failed: CheckpointSaveError | None = None
        if jax.process_index() == 0:
            self._forget_records_of_pruned_steps()

    def _open(self) -> ocp.CheckpointManager:
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """Every complete step, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Start saving `step` (returns once the arrays are copied off; writing continues in the background)."""
        self.wait()  # the previous save is complete: record its files before the next one starts
        self._saving = step
        with self._failures():
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta)), force=True)

    @contextlib.contextmanager
    def _failures(self):
        """Any exception while saving (in this thread or reported from orbax's) becomes one
        CheckpointSaveError, raised again by every later call: a failed save is not retried."""
        if self._failed is not None:
            raise self._failed
        try:
            yield
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many types for an I/O failure)
            intact = [s for s in self.steps() if s != self._saving]
            self._failed = CheckpointSaveError(
                f"saving checkpoint step {self._saving} in {self.directory} failed: {_cause(e)}; "
                + (f"the previous checkpoint (step {intact[-1]}) is intact: free space or fix the cause, then "
                   f"rerun to resume from it" if intact else "no earlier checkpoint exists"))
            raise self._failed from e

    def _record_integrity(self) -> None:
        """Sizes and CRC-32s of the files of every finished step that has no record yet (process 0)."""
        if jax.process_index() != 0:
            return
        self.integrity_dir.mkdir(parents=True, exist_ok=True)
        self._forget_records_of_pruned_steps()
        for step in self.steps():
            record = self.integrity_dir / f"{step}.json"
            if not record.exists():
                tmp = record.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(file_digests(self.directory / str(step)), sort_keys=True))
                tmp.replace(record)

    def _forget_records_of_pruned_steps(self) -> None:
        """Delete the records of steps orbax pruned (keep_checkpoints): a step number saved again later
        (a run restarted after every kept step was set aside) must get a fresh record, not be judged
        damaged against the old one."""
        kept = {str(step) for step in self.steps()}
        for record in self.integrity_dir.glob("*.json"):
            if record.stem.isdigit() and record.stem not in kept:
                record.unlink(missing_ok=True)

    def damage(self, step: int) -> str | None:
        """What differs between `step`'s files and their record (None: intact, or saved without a record)."""
        record = self.integrity_dir / f"{step}.json"
        if not record.exists():
            return None
        try:
            expected = json.loads(record.read_text())
        except ValueError:
            return f"its integrity record {record} is unreadable"
        step_dir = self.directory / str(step)
        for name, (size, crc) in sorted(expected.items()):
            path = step_dir / name
            if not path.is_file():
                return f"file {path} is missing"
            if path.stat().st_size != size:
                return f"file {path} has {path.stat().st_size} bytes, {size} when saved"
            if _crc32(path) != crc:
                return f"file {path} changed since it was saved (CRC-32 differs)"
        return None

    def set_aside(self, step: int, why: str = "corrupt") -> Path:
        """Rename a step out of orbax's sight (`<step>.<why>-<time>`, e.g. damaged or saved during a loss
        spike); the previous step becomes the latest. Process 0 renames; every process then reopens the
        manager."""
        stamp = time.strftime('%Y%m%d-%H%M%S')
        target = self.directory / f"{step}.{why}-{stamp}"
        for n in itertools.count(1):  # the same step set aside twice within a second (repeated rollbacks)
            if not target.exists():
                break
            target = self.directory / f"{step}.{why}-{stamp}-{n}"
        if jax.process_index() == 0:
            os.rename(self.directory / str(step), target)
            (self.integrity_dir / f"{step}.json").unlink(missing_ok=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.close()
        self._manager = self._open()
        return target

    def param_shapes(self, step: int) -> dict[tuple[str, ...], tuple[int, ...]]:
        """{parameter path: shape} saved at `step`, read from the metadata only (no array is read)."""
        return {path: tuple(meta.shape) for path, meta in flatten(self._manager.item_metadata(step)["params"]).items()}

    def restore(self, step: int, target_params: Any, target_opt_state: Any) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of `step`, read into the targets' shapes, dtypes and shardings."""
        meta = read_meta(self.directory / str(step), step)  # strict, and names the file (orbax's JSON would not)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target_params), opt_state=ocp.args.StandardRestore(target_opt_state)))
        return restored["params"], restored["opt_state"], meta

    def wait(self) -> None:
        """Block until every started save is complete on disk, and record its files."""
        with self._failures():
            self._manager.wait_until_finished()
            self._record_integrity()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._failed is None:
                self._manager.close()


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_digests(directory: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (bytes, CRC-32)} of every file under `directory`."""
    return {str(p.relative_to(directory)): (p.stat().st_size, _crc32(p))
            for p in sorted(directory.rglob("*")) if p.is_file()}


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying the matching sharding: a restore target on any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
