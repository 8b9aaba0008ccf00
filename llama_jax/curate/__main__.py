"""`python -m llama_jax.curate ...`: the `llama-jax-curate` command (`llama_jax.cli.curate`). The guard
matters: datatrove's local executor starts workers with forkserver, which re-imports the main module."""
import sys

if __name__ == "__main__":
    from llama_jax.cli.curate import run

    sys.exit(run())
