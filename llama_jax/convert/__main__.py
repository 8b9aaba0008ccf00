"""`python -m llama_jax.convert ...`: the `llama-jax-convert` command (`llama_jax.cli.convert`)."""
import sys

from llama_jax.cli.convert import run

if __name__ == "__main__":
    sys.exit(run())
