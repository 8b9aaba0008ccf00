"""Files and directories written so that a reader sees either nothing or all of it, and the tokenizer
files that travel with every checkpoint directory."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, purpose: str = "tmp") -> Iterator[Path]:
    """Yield a fresh hidden sibling of `path` to fill; it is renamed to `path` when the block ends, and
    removed if the block raises, so `path` exists only complete. `path` must not exist."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    tmp = path.parent / f".{path.name}.{purpose}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
