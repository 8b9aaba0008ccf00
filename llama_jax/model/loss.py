"""The language-model loss: per-token negative log-likelihood, shared by training and evaluation.

Two forms with the same numbers:

- `token_nll(logits, targets)`: from whole [batch, length, vocab] logits (what a caller that already has
  logits, e.g. a few scored positions, uses).
- `target_log_probs(hidden, head, targets, chunk_size)`: from the final normed hidden states and the
  output projection, in sequence chunks, so at most one chunk's [batch, chunk, vocab] logits exist at a
  time, forward and backward (the backward pass recomputes each chunk's logits: `jax.checkpoint` on the
  scanned chunk). At 128K tokens and LLaMA 3's vocabulary, whole fp32 logits of one sequence are 67 GB.

Chunks are strided, not contiguous: chunk j holds positions j, j + n, j + 2n, ... (n chunks). A length
split over devices (context parallelism: `activation_length` on the `context` mesh axis) then stays
split inside every chunk, each device computing its own positions' share; contiguous chunks would put
each chunk on one device. The loss is a sum over positions, so their order is irrelevant.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.model.cpu_fast_paths import matmul, target_logit
from llama_jax.parallel.logical import constrain

LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token in fp32: [batch, length, vocab], [batch, length] -> [batch, length]."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit(logits, targets)


def chunk_count(length: int, chunk_size: int) -> int:
    """The fewest chunks, each at most `chunk_size` positions, that split `length` evenly (a divisor)."""
    if chunk_size <= 0:
        raise ValueError(f"loss chunk size must be > 0, got {chunk_size}")
    n = -(-length // chunk_size)
    while length % n:
        n += 1
    return n


def _chunk_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(target) and target == argmax for one chunk: hidden [b, c, d], head [d, vocab], targets [b, c]."""
    b, c, d = hidden.shape
    logits = matmul(hidden.reshape(b * c, d).astype(head.dtype), head).astype(jnp.float32)
    logits = constrain(logits.reshape(b, c, head.shape[1]), LOGITS_AXES)
    log_probs = target_logit(logits, targets) - jax.nn.logsumexp(logits, axis=-1)
    return log_probs, jnp.argmax(logits, axis=-1) == targets


def target_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                     chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probability of each target and whether the target is the model's argmax.

    hidden [batch, length, dim]: the final normed hidden states (`api.hidden_states`); head [dim, vocab]
    in the compute dtype: the output projection (`api.head_kernel`); targets [batch, length] int.
    Returns (log p(target) [batch, length] fp32, target == argmax [batch, length] bool); -log p is
    `token_nll` of the logits hidden @ head, and the argmax is jnp.argmax's (the first of equal maxima).

    At most `chunk_size` positions' logits per row are live at once (see the module docstring); with one
    chunk nothing is recomputed, so short sequences run exactly as whole logits would.
    """
    batch, length, dim = hidden.shape
    n = chunk_count(length, chunk_size)
    if n == 1:
        return _chunk_log_probs(hidden, head, targets)
    size = length // n
    # position i*n + j -> chunk j, row i of it: [batch, size, n] -> [n, batch, size]
    hidden_chunks = hidden.reshape(batch, size, n, dim).transpose(2, 0, 1, 3)
    target_chunks = targets.reshape(batch, size, n).transpose(2, 0, 1)
    body = jax.checkpoint(lambda h, t: _chunk_log_probs(h, head, t),
                          policy=jax.checkpoint_policies.nothing_saveable)
    _, (log_probs, is_argmax) = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None,
                                             (hidden_chunks, target_chunks))
    unchunk = lambda x: x.transpose(1, 2, 0).reshape(batch, length)  # noqa: E731
    return unchunk(log_probs), unchunk(is_argmax)
