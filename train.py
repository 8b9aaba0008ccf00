"""Train a LLaMA: `python train.py [CONFIG.yaml] [key=value ...]`; `python train.py --help` for more.
The program is `llama_jax.cli.train` (also installed as the `llama-jax-train` command)."""
import sys

from llama_jax.cli.train import main, run

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run())
