"""Command-line entry points (`llama-jax-train`, `llama-jax-eval`, `llama-jax-convert`, `llama-jax-curate`): argument parsing and
exit codes only; the work happens in the packages below."""
