"""`python -m llama_jax.curate [CONFIG.yaml] [key=value ...]` and `... train-quality-models ...`.

A user error (bad config key, missing model or input file, unreadable shard, unknown stage/executor)
prints one `error: ...` line and exits 2. datatrove and the models load only when a run starts.
"""
from __future__ import annotations

import argparse
import json
import sys

from llama_jax.utils.config_io import ConfigError


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-jax-curate",
        description="Build a curated pretraining corpus (LLaMA's data recipe on datatrove). With no config: "
                    "the CommonCrawl pipeline on a built-in sample. `train-quality-models --help` for the "
                    "quality models.")
    parser.add_argument("config", nargs="?", help="YAML config (see llama_jax/configs/curate/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-jax-curate train-quality-models",
        description="Train the KenLM 5-gram (on reference pages) and the reference-page fastText "
                    "classifier (reference vs random pages). Inputs: JSONL, text in field 'text'.")
    parser.add_argument("--reference", required=True, help="JSONL of reference pages (e.g. Wikipedia)")
    parser.add_argument("--random", required=True, help="JSONL of random crawl pages")
    parser.add_argument("--out", required=True, help="directory for kenlm.bin, sp.model, reference.ftz")
    parser.add_argument("--order", type=int, default=5, help="n-gram order (default 5)")
    parser.add_argument("--vocab-size", type=int, default=4000, help="SentencePiece vocabulary (default 4000)")
    parser.add_argument("--dim", type=int, default=16, help="fastText dimension (default 16)")
    parser.add_argument("--bucket", type=int, default=10000, help="fastText hash buckets (default 10000)")
    return parser


def _train(argv: list[str]) -> int:
    from llama_jax.curate.quality_models import read_texts, train_quality_models

    args = _train_parser().parse_args(argv)
    models = train_quality_models(read_texts(args.reference), read_texts(args.random), args.out, args.order,
                                  args.vocab_size, args.dim, args.bucket)
    print(f"wrote {models.kenlm}, {models.sentencepiece}, {models.reference}")
    print(f"use: models.kenlm={models.kenlm} models.sentencepiece={models.sentencepiece} "
          f"models.reference={models.reference}")
    return 0


def _curate(argv: list[str]) -> int:
    from llama_jax.curate.config import load_config

    args = _run_parser().parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)

    from llama_jax.curate.funnel import FUNNEL_FILE, format_funnel
    from llama_jax.curate.run import MIXTURE_DIR, execute

    execute(cfg, report=print if cfg.progress else (lambda line: None))
    if cfg.executor.kind != "slurm":
        rows = json.loads((cfg.root / FUNNEL_FILE).read_text())
        print(format_funnel(rows))
        print(f"funnel: {cfg.root / FUNNEL_FILE}")
        if cfg.mixture.enabled:
            print(f"mixture: {cfg.root / MIXTURE_DIR} (train with data.sources=[{{kind: curated, "
                  f"path: {cfg.root / MIXTURE_DIR}}}])")
    return 0


def main(argv: list[str] | None = None) -> int:
    from llama_jax.curate.errors import CurateError
    from llama_jax.utils.extras import MissingExtra, require

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not {"-h", "--help"} & set(argv):
            require("curate", "llama-jax-curate")
        if argv[:1] == ["train-quality-models"]:
            return _train(argv[1:])
        return _curate(argv)
    except (ConfigError, CurateError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run() -> int:
    """The `llama-jax-curate` console script and `python -m llama_jax.curate`."""
    return main(sys.argv[1:])
