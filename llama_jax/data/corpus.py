"""The built-in demo corpus: the Python standard library's own source files.

Every machine that runs this project already has it, so the default training run needs no download.
It is read from the running interpreter's installation, `sysconfig.get_paths()["stdlib"]` (inside a
virtual environment that is the base interpreter's library), and consists of:

- every `*.py` file below that directory, in sorted relative-path order,
- except anything under `site-packages`/`dist-packages` (installed packages, not the standard library),
  the standard library's own test suites (`test`, `tests`, `idle_test` directories: ~20 MB of mostly
  generated cases, twice the size of the rest) and `__pycache__`.

With CPython 3.12 that is ~690 files, ~11.6 MB of UTF-8 text, ~3.5 M tokens at vocabulary size 8000.
Each file is one document. A file belongs to the validation split when the first 8 hex digits of the
SHA-256 of its relative path (POSIX form), read as an integer, are < 2% of 16**8; the rest is train. The
split therefore depends only on file names: it is the same on every machine with the same Python
version, and files added by a newer Python do not move the others.
"""
from __future__ import annotations

import functools
import hashlib
import platform
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
VALIDATION_FRACTION = 0.02


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _in_validation(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) < VALIDATION_FRACTION * 16**8


@functools.lru_cache(maxsize=None)
def _corpus_files() -> tuple[Path, ...]:
    """Every corpus file, both splits, sorted by relative path (walked once per process)."""
    root = stdlib_root()
    files = (p for p in root.rglob("*.py")
             if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def builtin_files(split: str) -> list[Path]:
    """The corpus files of `split` ("train" or "validation"), sorted by relative path."""
    if split not in ("train", "validation"):
        raise ValueError(f"builtin corpus split must be 'train' or 'validation', got {split!r}")
    root = stdlib_root()
    files = [p for p in _corpus_files()
             if _in_validation(p.relative_to(root).as_posix()) == (split == "validation")]
    if not files:
        raise FileNotFoundError(f"builtin corpus: no {split} .py files under {root}")
    return files


def fingerprint(split: str) -> str:
    """Identity of the corpus split (Python version, relative paths and sizes): a cache key."""
    root = stdlib_root()
    h = hashlib.sha256(f"{platform.python_implementation()} {platform.python_version()}\n".encode())
    for path in builtin_files(split):
        h.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return h.hexdigest()
