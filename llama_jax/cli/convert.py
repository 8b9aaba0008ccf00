"""`llama-jax-convert` (or `python -m llama_jax.convert`) --from meta|hf|orbax --to meta|hf|orbax SRC DST [options].

Exit status: 0 written, 2 bad input (one line naming the file and field) or an I/O error such as a full disk.
"""
from __future__ import annotations

import argparse
import re
import sys

from llama_jax.convert.common import DTYPES, FORMATS, ConvertError
from llama_jax.convert.hf import DEFAULT_SHARD_BYTES
from llama_jax.convert.pipeline import convert
from llama_jax.utils.extras import MissingExtra

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """"5GB", "500MiB" or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MiB, 1000000)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-jax-convert",
        description="Convert a LLaMA checkpoint between Meta's format, Hugging Face's and llama_jax's orbax "
                    "format, in any direction (also re-sharding or re-typing within one format).")
    parser.add_argument("--from", dest="src_format", choices=FORMATS,
                        help="source format (default: detected from SRC's files)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="target format")
    parser.add_argument("src", metavar="SRC", help="source checkpoint directory")
    parser.add_argument("dst", metavar="DST", help="target directory (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast every tensor (default: keep the source's)")
    parser.add_argument("--model-parallel", type=int, default=1, metavar="N",
                        help="number of Meta shards to write (--to meta); every split must divide by N")
    parser.add_argument("--preset", metavar="NAME",
                        help="model preset supplying what the source does not record (e.g. max_seq_len); "
                             "its shapes must match the source's")
    parser.add_argument("--meta-embedding-split-dim", type=int, choices=(0, 1),
                        help="--to meta: split tok_embeddings by rows (0, LLaMA 3) or columns (1, LLaMA 1/2); "
                             "default: 0 for LLaMA 3's 128256-token vocabulary, else 1")
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                        help="--to hf: largest safetensors file before sharding with an index (default 5GiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = convert(args.src, args.dst, to=args.to, src_format=args.src_format, dtype=args.dtype,
                      model_parallel=args.model_parallel, preset=args.preset,
                      meta_embedding_split_dim=args.meta_embedding_split_dim, max_shard_bytes=args.max_shard_size,
                      progress=not args.no_progress)
    except (ConvertError, MissingExtra, OSError) as e:  # bad input, a missing extra, an I/O error: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({args.to}; dim={cfg.dim}, n_layers={cfg.n_layers}, vocab_size={cfg.vocab_size})")
    return 0


def run() -> int:
    """The `llama-jax-convert` console script and `python -m llama_jax.convert`."""
    return main(sys.argv[1:])
