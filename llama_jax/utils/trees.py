"""Nested-dict parameter trees addressed by paths: ("layers", "attention", "wq", "kernel") -> array.

The model's pure-dict params, orbax metadata trees and converters' partial trees all use these, so
there is one meaning of "path" in the project.
"""
from __future__ import annotations

from typing import Any, Mapping

Path = tuple[str, ...]


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    """A nested mapping as {path: leaf}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix + (str(key),)))
        else:
            flat[prefix + (str(key),)] = value
    return flat


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """{path: leaf} as a nested dict (the inverse of `flatten`)."""
    tree: dict = {}
    for path, value in flat.items():
        set_path(tree, path, value)
    return tree


def get_path(tree: Mapping, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
    """tree[path[0]]...[path[-1]] = value, creating the intermediate dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def dotted(path: Path) -> str:
    """A path as users read it in messages: layers.attention.wq.kernel."""
    return ".".join(path)
