"""Throughput of the data pipeline alone (no model): tokens/s of packed training batches.

The pipeline must never be what a training step waits for: its tokens/s must exceed the tiny model's
training tokens/s (~3,000-10,000 on the 2-core CPU machine) at least tenfold. Defaults are the tiny
model's shapes: builtin demo corpus, vocabulary 8000, seq_len 256, global batch 8.

Reports three phases separately, each timed on its own:
  tokenizer  training (or loading) the builtin SentencePiece model,
  prepare    reading and tokenizing the corpus when the iterator is built (once per run without a
             token cache; the `--cache_dir` cache makes later runs skip it),
  steady     building batches (the per-step cost, the figure to compare with training tokens/s).

    python bench/data.py [--steps 2000] [--seq_len 256] [--batch_size 8] [--vocab_size 8000]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time


from llama_jax.data import DataConfig, make_train_iterator  # noqa: E402
from llama_jax.data.tokenizer import builtin_tokenizer  # noqa: E402
from quiet import monitor  # noqa: E402


def versions() -> str:
    import numpy
    import sentencepiece

    return (f"python {platform.python_version()}, numpy {numpy.__version__}, "
            f"sentencepiece {sentencepiece.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="batches timed in the steady phase")
    parser.add_argument("--repeats", type=int, default=5, help="steady-phase repetitions (median reported)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--cache_dir", default="", help="tokenizer/token cache (default: a fresh temp dir)")
    args = parser.parse_args(argv)

    if args.cache_dir:
        return run(args, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="llama_jax_bench_data_") as cache_dir:
        return run(args, cache_dir)


def run(args: argparse.Namespace, cache_dir: str) -> int:
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; {versions()}")
    print(f"shapes: seq_len {args.seq_len}, global batch {args.batch_size}, vocab {args.vocab_size}, "
          f"builtin corpus; cache_dir {cache_dir}")

    start = time.perf_counter()
    tokenizer = builtin_tokenizer(args.vocab_size, cache_dir)
    print(f"tokenizer: {time.perf_counter() - start:.2f} s")

    cfg = DataConfig(cache_dir=cache_dir)
    for phase in ("prepare (cold)", "prepare (cached)"):
        start = time.perf_counter()
        it = make_train_iterator(cfg, tokenizer, seq_len=args.seq_len, global_batch_size=args.batch_size)
        print(f"{phase}: {time.perf_counter() - start:.2f} s")

    tokens_per_batch = args.seq_len * args.batch_size
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        rates.append(args.steps * tokens_per_batch / (time.perf_counter() - start))
    print(f"steady: {statistics.median(rates):,.0f} tokens/s (median of {args.repeats} x {args.steps} "
          f"batches; min {min(rates):,.0f}, max {max(rates):,.0f})")
    return 0


if __name__ == "__main__":
    with monitor():
        sys.exit(main())
