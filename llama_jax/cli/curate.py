"""`python -m llama_jax.curate [CONFIG.yaml] [key=value ...]` and `... train-quality-models ...`.

A user error (bad config key, missing model or input file, unreadable shard, unknown stage/executor)
prints one `error: ...` line and exits 2. datatrove and the models load only when a run starts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

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
    parser.add_argument("--held-out", type=float, default=0.2,
                        help="share of each page set kept out of training to measure the models (default 0.2)")
    parser.add_argument("--cutoff-percentiles", type=float, nargs=2, default=[50.0, 99.0], metavar=("HEAD", "MIDDLE"),
                        help="perplexity percentiles of the held-out reference pages (or --cutoff-sample) that "
                             "end the head and middle buckets (default 50 99)")
    parser.add_argument("--cutoff-sample", help="JSONL of pages to take the cutoff percentiles of instead")
    parser.add_argument("--min-score", type=float, default=0.25,
                        help="the reference stage's p(reference) threshold the diagnostics measure (default 0.25)")
    return parser


def _train(argv: list[str]) -> int:
    from llama_jax.curate.quality_models import CutoffSettings, read_texts, train_quality_models

    args = _train_parser().parse_args(argv)
    head, middle = args.cutoff_percentiles
    if not 0 < head <= middle <= 100:
        raise ConfigError(f"--cutoff-percentiles: two increasing numbers in (0, 100], got {head} {middle}")
    if not 0 < args.held_out < 1:
        raise ConfigError(f"--held-out: a share in (0, 1), got {args.held_out}")
    sample = tuple(read_texts(args.cutoff_sample)) if args.cutoff_sample else ()
    models = train_quality_models(read_texts(args.reference), read_texts(args.random), args.out, args.order,
                                  args.vocab_size, args.dim, args.bucket, args.held_out,
                                  CutoffSettings((head, middle), sample), args.min_score)
    print(models.report)
    for warning in models.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in (models.kenlm, models.sentencepiece, models.reference, models.cutoffs, models.diagnostics):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    print(f"use: models.kenlm={models.kenlm} models.sentencepiece={models.sentencepiece} "
          f"models.reference={models.reference} (the quality stage reads {models.cutoffs.name} beside kenlm.bin)")
    return 0


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send this process's stderr to `path` for the duration, then put it back: datatrove's per-task
    console logs (also kept per task in each phase's logs/), so the terminal shows only the progress
    lines. Both the file descriptor (worker processes) and `sys.stderr` (tasks run in this process,
    whose logger writes to it) are redirected. Only the command line does this; `execute` leaves stderr
    to its caller."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    with path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = log
        try:
            yield
        finally:
            log.flush()
            sys.stderr = saved_stream
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


def _curate(argv: list[str]) -> int:
    from llama_jax.curate.config import load_config

    args = _run_parser().parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)

    from llama_jax.curate.funnel import FUNNEL_FILE, format_funnel
    from llama_jax.curate.run import MIXTURE_DIR, WORKER_LOG, execute

    submits = cfg.executor.kind == "slurm"  # its jobs log under logs/ themselves
    with contextlib.nullcontext() if submits else _stderr_to(cfg.root / WORKER_LOG):
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
