"""llama_jax: LLaMA in JAX/Flax NNX — training, checkpoint conversion and evaluation."""
