"""Evaluate a LLaMA checkpoint: `python eval.py perplexity|tasks|generate CHECKPOINT ...`; `--help` for more.
The program is `llama_jax.cli.eval` (also installed as the `llama-jax-eval` command)."""
import sys

from llama_jax.cli.eval import main, run

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run())
