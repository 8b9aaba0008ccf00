"""Evaluation of a LLaMA checkpoint in JAX: perplexity, zero-shot multiple choice, generation.

`loading` turns any checkpoint (run directory, params directory, Meta or Hugging Face) into an
`EvalModel` placed on the device mesh; `scoring` is the one jitted forward pass that gives per-token
log-likelihoods, shared by `perplexity` and `tasks`; `generate` decodes with a KV cache inside one jit.
`eval.py` at the repository root is the command line.
"""
