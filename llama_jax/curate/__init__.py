"""Pretraining-data curation (the LLaMA paper's recipe) on datatrove: `python -m llama_jax.curate`.

Layering: imports `llama_jax.utils` and `llama_jax.data` only. datatrove, fastText and KenLM are
imported by the modules that run stages, never by `llama_jax.data`.
"""
