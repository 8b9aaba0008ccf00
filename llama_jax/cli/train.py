"""Train a LLaMA: `python train.py [CONFIG.yaml] [key=value ...]` (the same as `llama-jax-train`).

With no arguments it trains the tiny default run (configs/train/default.yaml) on the built-in corpus.
Rerunning the same command resumes the run from its latest checkpoint.

    python train.py                                   # the default run
    python train.py configs/train/llama1-7b.yaml      # a full config
    python train.py model=llama1-65b mesh.fsdp=256    # the default config with overrides
    python train.py tokenizer --data DIR --vocab-size 32000 --output tok
    python train.py instruction-task data/reverse-words  # a generated task for configs/train/sft-tiny.yaml
    python train.py plan model=llama1-65b mesh.fsdp=256   # memory per device, nothing allocated

Errors are one line; `--debug` (anywhere) adds the tracebacks, also those of orbax's threads.

Exit status: 0 done (or stopped at stop_at_step), 1 training diverged (NaN/inf, or a loss spike with no
rollback left), 2 bad configuration or input, or an I/O error such as a full disk (the previous
checkpoint is intact), 143 preempted by SIGTERM after saving a checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from llama_jax.cli.flags import add_flag, run_program

USAGE = __doc__.split("\n\n")[0] + "\nSubcommands: tokenizer, instruction-task, plan. Run `python train.py --help` for more."


def tokenizer_main(argv: list[str]) -> int:
    """`python train.py tokenizer --data PATH_OR_GLOB [--data ...] --vocab-size N --output PREFIX`."""
    from llama_jax.data.sources import resolve_paths
    from llama_jax.data.tokenizer import train_sentencepiece

    parser = argparse.ArgumentParser(
        prog="train.py tokenizer",
        description="Train a SentencePiece BPE tokenizer with LLaMA's settings on plain-text files.")
    parser.add_argument("--data", action="append", required=True,
                        help="text file, directory (all files under it) or glob; repeat for more")
    add_flag(parser, "--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    args = parser.parse_args(argv)
    try:
        files = [f for pattern in args.data for f in resolve_paths(pattern, key="--data")]
        path = train_sentencepiece(files, args.vocab_size, args.output)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def instruction_task_main(argv: list[str]) -> int:
    """`python train.py instruction-task DIR`: the generated fine-tuning task (llama_jax.data.instruction_task)."""
    from llama_jax.data.instruction_task import write_reverse_words

    parser = argparse.ArgumentParser(prog="train.py instruction-task",
                                     description="Write DIR/{train,validation,test}.jsonl: 'reverse these words' "
                                                 "in Alpaca format.")
    parser.add_argument("directory")
    for path in write_reverse_words(parser.parse_args(argv).directory):
        print(path)
    return 0


def _subcommand(name: str, argv: list[str]) -> int:
    if name == "tokenizer":
        return tokenizer_main(argv)
    if name == "instruction-task":
        return instruction_task_main(argv)
    from llama_jax.training.plan import plan_cli

    return plan_cli(argv)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("tokenizer", "instruction-task", "plan"):
        return _subcommand(argv[0], argv[1:])
    config_path = None
    if argv and "=" not in argv[0] and argv[0].endswith((".yaml", ".yml")):
        config_path, argv = argv[0], argv[1:]
    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        print(f"error: unexpected argument {bad[0]!r} (expected a CONFIG.yaml first, then key=value "
              f"overrides, or a subcommand: tokenizer, instruction-task, plan)\n{USAGE}", file=sys.stderr)
        return 2

    from llama_jax.utils.config_io import ConfigError
    from llama_jax.checkpoint.run import CheckpointSaveError
    from llama_jax.training.config import load_train_config
    from llama_jax.training.loop import TrainingDiverged, train

    try:
        result = train(load_train_config(config_path, argv))
    except (ConfigError, ValueError, OSError, CheckpointSaveError, TrainingDiverged) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingDiverged) else 2
    return 143 if result.status == "preempted" else 0


def run() -> int:
    """The `llama-jax-train` console script and `python train.py`. The process is the command's, so here (not
    in `main`, which tests and notebooks call) and once, library threads' tracebacks are hidden for the rest
    of it unless `--debug` is given (llama_jax/cli/quiet.py)."""
    if "--debug" not in sys.argv[1:]:
        from llama_jax.cli.quiet import hide_library_tracebacks

        hide_library_tracebacks()
    return run_program(main)
