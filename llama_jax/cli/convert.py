"""`llama-jax-convert` (or `python -m llama_jax.convert`) --from meta|hf|orbax --to meta|hf|orbax SRC DST [options].

Every option is also a `key=value` setting (`dtype=bfloat16 max_shard_size=500MiB`); the options are
`llama_jax.convert.options.ConvertOptions`. Exit status: 0 written, 2 bad input (one line naming the
file and field, or the option and its accepted values) or an I/O error such as a full disk.
"""
from __future__ import annotations

import sys

from llama_jax.cli.options import OVERRIDES_HELP, OneLineParser, add_option_flags, parse_command
from llama_jax.convert.common import ConvertError
from llama_jax.convert.options import ConvertOptions
from llama_jax.convert.pipeline import convert
from llama_jax.utils.config_io import ConfigError
from llama_jax.utils.extras import MissingExtra


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="llama-jax-convert",
        description="Convert a LLaMA checkpoint between Meta's format, Hugging Face's and llama_jax's orbax "
                    "format, in any direction (also re-sharding or re-typing within one format).",
        epilog=OVERRIDES_HELP)
    add_option_flags(parser, ConvertOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        _, options = parse_command(build_parser(), sys.argv[1:] if argv is None else argv, ConvertOptions)
        cfg = convert(**options.convert_kwargs())
    except (ConfigError, ConvertError, MissingExtra, OSError) as e:  # bad input, a missing extra, an I/O error
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {options.dst} ({options.to}; dim={cfg.dim}, n_layers={cfg.n_layers}, vocab_size={cfg.vocab_size})")
    return 0


def run() -> int:
    """The `llama-jax-convert` console script and `python -m llama_jax.convert`."""
    return main(sys.argv[1:])
