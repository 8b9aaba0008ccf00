"""A checkpoint's `meta` item (`checkpoints/<step>/meta/data.json`): read strictly, or not at all.

The meta says where training stands beyond the arrays: the step, the data iterator's position and the
spike detector's recent history and, for LoRA runs, the base checkpoint the adapters modify. A value of the wrong type here would not fail loudly: a float batch
counter or a negative row count would silently resume on other data than the run saw. So every field is
checked (type, range, no unknown keys) and any problem is one `CheckpointMetaError` line naming the file
and the field; the caller treats the step as damaged and falls back to the previous one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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
