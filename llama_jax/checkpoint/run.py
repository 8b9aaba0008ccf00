"""A training run's checkpoints: orbax v1's training Checkpointer under `RUN/checkpoints/`, one step per directory.

Each step directory holds three items: `params` (the model's pure dict), `opt_state` (optax state, same
tree as the parameters it mirrors) and `meta` (JSON: step, data-iterator state, seed, spike detector;
read back by `read_meta`, at the end of this module, which checks every field). Every process
calls `save` and `restore` (orbax writes and reads each process's shards cooperatively); saves are
asynchronous, so training continues while the arrays are written.

Crash safety is orbax's: a step is written into a temporary directory and renamed (or, on object
stores, marked committed) only when complete, so a process killed mid-save leaves at worst an
unfinished temporary directory, which `latest_step` ignores and the next start deletes.

Restoring takes the target tree of `jax.ShapeDtypeStruct`s with shardings: the arrays are read directly
into that layout, whatever mesh wrote them (resharding on restore). `param_shapes` reads the saved
shapes from the metadata alone, so the caller can compare them with the config before anything is
read or compiled.

Damage after the fact (a truncated, zeroed or deleted file) is what orbax cannot see: as soon as orbax has
committed a step (in the background thread that waits for the save, before `wait` returns and before
the next save starts),
process 0 records every file's size and CRC-32 in `RUN/checkpoint_integrity/<step>.json`
(`llama_jax.checkpoint.integrity`). `damage(step)` compares the files with that record (one line naming
the first file that differs, or saying the step has no record: a job killed between orbax's commit and
the record leaves such a step, which nothing reads), and `set_aside(step)` renames a damaged step to
`checkpoints/<step>.corrupt-<time>` (never deleted; orbax no longer sees it) so that the previous step
becomes the latest. A record is only written for the step this process has just saved.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.checkpoint import integrity, orbax_io
from llama_jax.checkpoint.integrity import CheckpointDamaged
from llama_jax.checkpoint.layout import RUN_CHECKPOINT_DIR, RUN_INTEGRITY_DIR, step_record
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
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / RUN_CHECKPOINT_DIR
        self.integrity_dir = self.run_dir / RUN_INTEGRITY_DIR
        self._options = dict(keep=keep, keep_period=keep_period, async_save=async_save)
        self._manager = self._open()
        self._saving: int | None = None  # the step whose save may still be in flight
        self._failed: CheckpointSaveError | None = None
        if jax.process_index() == 0:
            self._forget_records_of_pruned_steps()

    def _open(self) -> orbax_io.RunManager:
        return orbax_io.RunManager(self.directory, **self._options, on_committed=self._committed)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def steps(self) -> list[int]:
        """Every complete step, oldest first."""
        return self._manager.steps()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Start saving `step` (returns once the arrays are copied off; writing continues in the background)."""
        self.wait()  # one save at a time: a failure is reported for the step it concerns
        self._saving = step
        with self._failures():
            self._manager.save(step, params, opt_state, meta)

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

    def _committed(self, step: int) -> None:
        """Record `step`'s files, which orbax has just committed (called in the thread waiting for the save)."""
        if jax.process_index() != 0:
            return
        integrity.write_record(self.record(step), self.directory / str(step))
        self._forget_records_of_pruned_steps()

    def record(self, step: int) -> Path:
        """Where the integrity record of `step` is (`layout.step_record`)."""
        return step_record(self.run_dir, step)

    def _forget_records_of_pruned_steps(self) -> None:
        """Delete the records of steps orbax pruned (keep_checkpoints): a step number saved again later
        (a run restarted after every kept step was set aside) must get a fresh record, not be judged
        damaged against the old one."""
        kept = {p.name for p in self.directory.iterdir() if p.name.isdigit()} if self.directory.is_dir() else set()
        for record in self.integrity_dir.glob("*.json"):
            if record.stem.isdigit() and record.stem not in kept:
                record.unlink(missing_ok=True)

    def damage(self, step: int) -> str | None:
        """What differs between `step`'s files and their record (None: intact), or that it has no record."""
        return integrity.damage(self.record(step), self.directory / str(step))

    def set_aside(self, step: int, why: str = "corrupt") -> Path:
        """Rename a step out of orbax's sight (`<step>.<why>-<time>`, e.g. damaged or saved during a loss
        spike), and its record with it (`checkpoint_integrity/<step>.<why>-<time>.json`: renaming both back
        by hand restores the step, checked like any other); the previous step becomes the latest. Process 0
        renames; every process then reopens the manager."""
        stamp = time.strftime('%Y%m%d-%H%M%S')
        target = self.directory / f"{step}.{why}-{stamp}"
        for n in itertools.count(1):  # the same step set aside twice within a second (repeated rollbacks)
            if not target.exists():
                break
            target = self.directory / f"{step}.{why}-{stamp}-{n}"
        if jax.process_index() == 0:
            os.rename(self.directory / str(step), target)
            if self.record(step).is_file():
                os.rename(self.record(step), self.integrity_dir / f"{target.name}.json")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.close()
        self._manager = self._open()
        return target

    def param_shapes(self, step: int) -> dict[tuple[str, ...], tuple[int, ...]]:
        """{parameter path: shape} saved at `step`, read from the metadata only (no array is read)."""
        return {path: tuple(meta.shape) for path, meta in flatten(self._manager.param_metadata(step)).items()}

    def restore(self, step: int, target_params: Any, target_opt_state: Any) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of `step`, read into the targets' shapes, dtypes and shardings.
        Parameters holding NaN or inf are `CheckpointDamaged` (a run never saves them: the loop stops first)."""
        meta = read_meta(self.directory / str(step), step)  # strict, and names the file (orbax's JSON would not)
        params, opt_state = self._manager.restore(step, target_params, target_opt_state)
        finite = jax.device_get(jax.jit(lambda tree: {p: jnp.isfinite(x).all() for p, x in flatten(tree).items()})(
            params))
        if bad := [p for p, ok in sorted(finite.items()) if not ok]:
            raise CheckpointDamaged(f"parameter {'.'.join(bad[0])} holds NaN or inf ({len(bad)} parameter(s) do)")
        return params, opt_state, meta

    def wait(self) -> None:
        """Block until every started save is complete on disk and recorded."""
        with self._failures():
            self._manager.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._failed is None:
                self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying the matching sharding: a restore target on any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# The `meta` item (`checkpoints/<step>/meta/data.json`), read strictly or not at all. It says where training
# stands beyond the arrays: the step, the data iterator's position, the spike detector's recent history and,
# for LoRA runs, the base checkpoint the adapters modify. A value of the wrong type here would not fail
# loudly: a float batch counter or a negative row count would silently resume on other data than the run
# saw. So every field is checked (type, range, no unknown keys) and any problem is one `CheckpointMetaError`
# line naming the file and the field; the caller treats the step as damaged and falls back to the previous one.


class CheckpointMetaError(ValueError):
    """A checkpoint's meta file is unreadable or a field has the wrong type or value."""


def meta_path(step_dir: Path) -> Path:
    """`meta/data.json` (orbax v1's JSON file name), or `meta/metadata` in a step saved before llama_jax
    used orbax v1 (its v0 name)."""
    legacy = step_dir / "meta" / "metadata"
    return legacy if legacy.is_file() and not (step_dir / "meta" / "data.json").exists() else step_dir / "meta" / "data.json"


def _int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointMetaError(f"{field}: expected an integer >= {minimum}, got {value!r:.80}")
    return value


def _mapping(value: Any, field: str, keys: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise CheckpointMetaError(f"{field}: expected a mapping, got {type(value).__name__}")
    missing, unknown = sorted(keys - set(value)), sorted(set(value) - keys - optional)
    if missing or unknown:
        raise CheckpointMetaError(f"{field}: {'missing key ' + missing[0] if missing else 'unknown key ' + unknown[0]}")
    return value


def _list(value: Any, field: str) -> list:
    if not isinstance(value, list):
        raise CheckpointMetaError(f"{field}: expected a list, got {type(value).__name__}")
    return value


def _finite(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointMetaError(f"{field}: expected a finite number, got {value!r:.80}")
    return value


def check_meta(meta: Any, step: int) -> dict:
    """`meta` itself if it is a valid meta of checkpoint `step`, else CheckpointMetaError (no file named)."""
    meta = _mapping(meta, "meta", {"step", "data", "seed"}, optional={"spikes", "lora_base"})
    if _int(meta["step"], "step", 0) != step:
        raise CheckpointMetaError(f"step: {meta['step']} in the checkpoint directory of step {step}")
    if isinstance(meta["seed"], bool) or not isinstance(meta["seed"], int):
        raise CheckpointMetaError(f"seed: expected an integer, got {meta['seed']!r:.80}")
    data = _mapping(meta["data"], "data", {"batch", "source_rows", "seq_len", "global_batch_size"})
    _int(data["batch"], "data.batch", 0)
    _int(data["seq_len"], "data.seq_len", 1)
    _int(data["global_batch_size"], "data.global_batch_size", 1)
    rows = _list(data["source_rows"], "data.source_rows")
    if not rows:
        raise CheckpointMetaError("data.source_rows: empty")
    for i, n in enumerate(rows):
        _int(n, f"data.source_rows[{i}]", 0)
    if "lora_base" in meta and not (isinstance(meta["lora_base"], str) and meta["lora_base"]):
        raise CheckpointMetaError(f"lora_base: expected the base checkpoint's path, got {meta['lora_base']!r:.80}")
    if "spikes" in meta:
        spikes = _mapping(meta["spikes"], "spikes", {"recent", "streak"})
        for i, pair in enumerate(_list(spikes["recent"], "spikes.recent")):
            if not isinstance(pair, list) or len(pair) != 2:
                raise CheckpointMetaError(f"spikes.recent[{i}]: expected [loss, grad_norm], got {pair!r:.80}")
            _finite(pair[0], f"spikes.recent[{i}][0]")
            _finite(pair[1], f"spikes.recent[{i}][1]")
        for i, s in enumerate(_list(spikes["streak"], "spikes.streak")):
            if _int(s, f"spikes.streak[{i}]", 1) > step:
                raise CheckpointMetaError(f"spikes.streak[{i}]: step {s} is after the checkpoint's step {step}")
    return meta


def read_meta(step_dir: Path, step: int) -> dict:
    """The checked meta of the checkpoint in `step_dir`; any problem is one line naming the file."""
    path = meta_path(step_dir)
    try:
        return check_meta(json.loads(path.read_bytes().decode("utf-8")), step)
    except OSError as e:
        raise CheckpointMetaError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise CheckpointMetaError(f"{path}: not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        if isinstance(e, CheckpointMetaError):
            raise CheckpointMetaError(f"{path}: {e}") from None
        raise CheckpointMetaError(f"{path}: not JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
