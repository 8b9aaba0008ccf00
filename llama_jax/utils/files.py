"""Files and directories written so that a reader sees either nothing or all of it, and the tokenizer
files that travel with every checkpoint directory."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from llama_jax.utils.text import lone_surrogate_in

# What a checkpoint directory (ours, Meta's, Hugging Face's) may hold as its tokenizer, preferred first.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    """The tokenizer files present in `directory`, in `TOKENIZER_FILES` order."""
    return [Path(directory) / name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()]


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`.

    Caches shared between processes (tokenizer models, token ids) rely on this: two processes racing to
    create the same file each rename a complete copy, and a reader never opens half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (PermissionError: it does, under another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_siblings(path: Path, purpose: str) -> list[Path]:
    """Remove the temporary siblings of `path` left by dead processes of this host (a killed conversion
    leaves `.NAME.PURPOSE-HOST-PID`); those of live processes or other hosts are kept. Returns the removed."""
    host, removed = socket.gethostname(), []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.{purpose}-*"):
        owner_host, _, pid = candidate.name.rpartition("-")
        if owner_host.endswith(f".{purpose}-{host}") and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, purpose: str = "tmp") -> Iterator[Path]:
    """Yield a fresh hidden sibling of `path` to fill; it is renamed to `path` when the block ends, and
    removed if the block raises, so `path` exists only complete. `path` must not exist.

    The sibling is named `.NAME.PURPOSE-HOST-PID`; leftovers of killed processes on this host are
    removed first, with a warning on stderr.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    for stale in remove_stale_siblings(path, purpose):
        print(f"warning: removed {stale}, left by a process that no longer runs", file=sys.stderr)
    tmp = path.parent / f".{path.name}.{purpose}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_objects(path: str | os.PathLike, error: type[ValueError] = ValueError,
                 prefix: str = "") -> Iterator[tuple[int, str, dict]]:
    """(line number, "PREFIXPATH:LINE", object) for each non-empty line of a JSONL file; anything else
    (missing, unreadable, not UTF-8, a line that is not a JSON object, a string holding a lone surrogate)
    raises `error` in one line. Lines end at "\n" only: U+2028, U+0085 and the like are text inside a JSON
    string (str.splitlines would cut the record there), and line numbers are grep -n's."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise error(f"{prefix}{path} is not UTF-8 text ({e.reason})") from None
    except FileNotFoundError:
        raise error(f"{prefix}file {path} does not exist") from None
    except (OSError, ValueError) as e:  # a directory, unreadable, a NUL in the name
        raise error(f"{prefix}cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{prefix}{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise error(f"{where}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
        if (surrogate := lone_surrogate_in(record)) is not None:
            raise error(f"{where}: {surrogate}")
        yield number, where, record
