"""Our datatrove blocks, each for a job datatrove has no block for. Importing this package imports
datatrove; nothing in `llama_jax.data` does."""
