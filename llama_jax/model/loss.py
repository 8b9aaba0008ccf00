"""The language-model loss: per-token negative log-likelihood, shared by training and evaluation."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.model.cpu_fast_paths import target_logit


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token in fp32: [batch, length, vocab], [batch, length] -> [batch, length]."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit(logits, targets)
