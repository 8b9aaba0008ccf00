"""Each saved file's size and CRC-32, recorded as soon as its save is durable and checked before any read.

Orbax makes a save atomic (nothing half-written is ever visible), but cannot see damage after the fact:
a truncated, zeroed, bit-flipped or deleted file. The writer that has just written a step (or a params
directory) records {relative path: [bytes, CRC-32]} of its files in a JSON file, written to a temporary
name, flushed to disk and renamed; every reader compares the files with the record first. Records are
only ever written by the code that wrote the files, right after writing them: a record made later for
files found on disk would bless whatever damage they already had.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path


class CheckpointDamaged(ValueError):
    """A checkpoint's files differ from their record, or its values are not finite; one line naming the
    file or parameter (exit 2 in the commands)."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_digests(directory: Path, under: str = "") -> dict[str, tuple[int, int]]:
    """{path relative to `directory`: (bytes, CRC-32)} of every file under `directory / under`."""
    return {str(p.relative_to(directory)): (p.stat().st_size, _crc32(p))
            for p in sorted((directory / under).rglob("*")) if p.is_file()}


def write_record(record: Path, directory: Path, under: str = "") -> None:
    """Record the files under `directory / under` in `record`, atomically and durably."""
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(file_digests(directory, under), f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(record)


def damage(record: Path, directory: Path) -> str | None:
    """What differs between the files under `directory` and `record` (None: all as recorded). A missing
    record is reported too: the callers decide what an unverified save is worth (`record.is_file()`)."""
    if not record.is_file():
        return f"it has no integrity record ({record})"
    try:
        expected = json.loads(record.read_text())
        items = sorted(expected.items())
        if not items:
            raise ValueError("it lists no file")
        for name, value in items:
            if Path(name).is_absolute() or ".." in Path(name).parts or not name:
                raise ValueError(f"file name {name!r:.80} is not a path inside {directory}")
            if not (isinstance(value, list) and len(value) == 2
                    and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)):
                raise ValueError(f"{name!r:.80}: expected [bytes, crc32], got {value!r:.80}")
    except (ValueError, AttributeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return f"its integrity record {record} is unreadable ({why})"
    for name, (size, crc) in items:
        path = directory / name
        if not path.is_file():
            return f"file {path} is missing"
        if path.stat().st_size != size:
            return f"file {path} has {path.stat().st_size} bytes, {size} when saved"
        if _crc32(path) != crc:
            return f"file {path} changed since it was saved (CRC-32 differs)"
    return None

