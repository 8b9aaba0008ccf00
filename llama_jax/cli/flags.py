"""One flag style for every command: `--kebab-case`. The underscore spellings of earlier releases
(`--no_bos`, `--max_new_tokens`) still work for one release, hidden from --help, with a warning."""
from __future__ import annotations

import argparse
import sys


def _deprecated(parser: argparse.ArgumentParser, action, new: str):
    """The action class of `action` that first warns that its option string is an old spelling."""
    base = parser._registry_get("action", action, action)

    class Deprecated(base):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {option_string} is deprecated and will be removed; use {new}", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    return Deprecated


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """`--name-with-dashes` plus, for one release, a hidden `--name_with_underscores` alias."""
    parser.add_argument(name, **kwargs)
    old = "--" + name[2:].replace("-", "_")
    if old != name:
        alias = {k: v for k, v in kwargs.items() if k not in ("help", "required", "default", "action")}
        alias["dest"] = kwargs.get("dest", name[2:].replace("-", "_"))
        parser.add_argument(old, **alias, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            action=_deprecated(parser, kwargs.get("action", "store"), name))


def run_program(main) -> int:
    """What a console script and the top-level scripts run: tune the host allocator (on JAX's CPU backend
    it restarts the program once, before any work: see llama_jax/utils/host_memory.py), then
    `main(sys.argv[1:])`."""
    from llama_jax.utils.host_memory import tune_host_allocator

    tune_host_allocator()
    return main(sys.argv[1:])
