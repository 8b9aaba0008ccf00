"""A command's options as one dataclass: flags generated from its fields, `key=value` overrides, one-line errors.

An option is defined once, as a field of a frozen dataclass that the project's config loader
(`llama_jax.utils.config_io.from_dict`) builds and checks, as it does a training config: type, default,
allowed values (`metadata["choices"]`) and help (`metadata["help"]`). `add_option_flags` turns every
field into a flag: `--kebab-case` of its name, nested sections (`mesh`, `distributed`) by their own
field names (`--fsdp`, `--coordinator-address`), unless `metadata["flag"]` or SECTION_FLAGS name it
otherwise; `metadata["positional"]` makes a positional argument. A `bool` field is a switch (`--ignore-eos`
when it defaults to false, `--no-progress` when true; `bool | None`: both `--bos` and `--no-bos`), a list
field a repeatable flag. Flags start absent, so defaults live in the dataclass alone.

`parse_command` reads the flags, then applies the `key=value` overrides among the arguments (after the
flags, so they win), and builds the dataclass: `--fsdp 2` and `mesh.fsdp=2` give the same options. Every
problem is a ConfigError of one line naming the option, the value and, for choices, the accepted ones;
the commands print it and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any, Iterator

from llama_jax.cli.flags import add_flag
from llama_jax.utils.config_io import ConfigError, apply_overrides, from_dict, set_path

# Flags of nested sections whose name is not the field's own (`--distributed off` sets distributed.mode).
SECTION_FLAGS = {"mesh.data": "--data-parallel", "mesh.context": "--context-parallel",
                 "distributed.mode": "--distributed"}
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")
OVERRIDES_HELP = ("Every option is also a key=value setting, applied after the flags (values are YAML): the flag's "
                  "name with underscores (--batch-size 4: batch_size=4) or the key its help names (mesh.fsdp=2).")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a ConfigError (one line; the command exits 2) instead of the
    usage text and SystemExit."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")


def option_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) of every leaf field of dataclass `cls`, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from option_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _flag(key: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or SECTION_FLAGS.get(key) or "--" + f.name.replace("_", "-")


def _value_type(tp: Any):
    """What argparse converts a flag's text with: the one type of `T` or `T | None`, else the text."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] \
        if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    return args[0] if len(args) == 1 and args[0] in (int, float) else str


def _help(key: str, f: dataclasses.Field, flag: str, shown_default: bool = True) -> str:
    """The field's help, its default where that says something, and its key where the flag's name is not it."""
    text = f.metadata.get("help", "")
    if shown_default and not _required(f) and f.default not in (None, "", dataclasses.MISSING) and "default" not in text:
        text += f" (default: {f.default})"
    if flag.removeprefix("--no-").removeprefix("--").replace("-", "_") != key:
        text += f" (key: {key})"
    return text.strip()


def add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument of `parser` per leaf field of `cls` (see the module's docstring)."""
    for key, f, tp in option_fields(cls):
        if f.metadata.get("positional"):
            parser.add_argument(key, metavar=key.upper(), help=_help(key, f, key))
            continue
        flag, common = _flag(key, f), {"dest": key, "default": argparse.SUPPRESS}
        if tp == bool | None or tp == typing.Optional[bool]:
            pair = parser.add_mutually_exclusive_group()
            pair.add_argument(flag, action="store_const", const=True, **common, help=_help(key, f, flag, False))
            no_help = f.metadata.get("no_help", f"the opposite of {flag}")
            add_flag(pair, "--no-" + flag[2:], action="store_const", const=False, **common, help=no_help)
        elif tp is bool:
            switch = "--no-" + flag[2:] if f.default else flag
            add_flag(parser, switch, action="store_false" if f.default else "store_true", **common,
                     help=_help(key, f, switch, False))
        elif typing.get_origin(tp) is list:
            add_flag(parser, flag, action="append", metavar=f.name.upper(), **common,
                     help=_help(key, f, flag, False) + " (repeatable)")
        else:
            choices = f.metadata.get("choices")
            add_flag(parser, flag, type=_value_type(tp), choices=choices, metavar=None if choices else f.name.upper(),
                     **common, help=_help(key, f, flag))


def options_from(cls: type, given: dict[str, Any], overrides: list[str]):
    """Dataclass `cls` from flag values keyed by dotted key, then the `key=value` overrides."""
    data: dict[str, Any] = {}
    for key, value in given.items():
        set_path(data, key.split("."), value, key)
    data = apply_overrides(data, overrides)
    for key, f, _ in option_fields(cls):
        if _required(f) and key not in data:
            raise ConfigError(f"missing {_flag(key, f)} (or {key}=...)")
    return from_dict(cls, data)


def parse_command(parser: argparse.ArgumentParser, argv: list[str], options: type | dict[str, type]):
    """(subcommand or None, options dataclass) of `argv`: `options` is the dataclass, or one per
    subcommand of `parser`. Arguments that are neither flags nor positionals must be `key=value`."""
    namespace, extras = parser.parse_known_args(argv)
    given = vars(namespace)
    command = given.pop("command", None)
    stray = [a for a in extras if not OVERRIDE.match(a)]
    if stray:
        raise ConfigError(f"{parser.prog}{' ' + command if command else ''}: unrecognized argument {stray[0]!r} "
                          f"(see --help; settings may also be given as key=value)")
    return command, options_from(options[command] if command else options, given, extras)

