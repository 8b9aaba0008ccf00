"""The chunked loss (`transformer.log_probs_in_chunks`) against the whole-logits one (`token_nll`).

Oracles: `token_nll` of the whole logits hidden @ head, and `jnp.argmax` of them, for the values; jax's
gradients of that whole-logits loss for the gradients (fp32, highest matmul precision: conftest). For
memory, XLA's own buffer assignment of the compiled train-step gradient on the CPU: the temporary bytes
must not grow with length × vocab, which the whole-logits step (the control) does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model import api, transformer
from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import chunk_count, log_probs_in_chunks, token_nll
from llama_jax.training.step import batch_nll

TOL = 1e-6  # fp32: the chunked and whole forms add the same terms, in another order at most


def _whole_log_probs(hidden, head, targets):
    logits = (hidden @ head).astype(jnp.float32)
    return -token_nll(logits, targets), jnp.argmax(logits, axis=-1) == targets


@pytest.mark.parametrize("length,chunk_size,chunks", [(24, 8, 3), (24, 5, 6), (24, 24, 1), (7, 2, 7)])
def test_chunk_count_divides_the_length(length, chunk_size, chunks):
    assert chunk_count(length, chunk_size) == chunks


@pytest.mark.parametrize("chunk_size", [4, 5, 24])
def test_chunked_log_probs_and_gradients_equal_whole_logits(chunk_size):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 24, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 40, (2, 24)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 24)), jnp.float32)

    log_probs, is_argmax = log_probs_in_chunks(hidden, head, targets, chunk_size)
    want_log_probs, want_argmax = _whole_log_probs(hidden, head, targets)
    np.testing.assert_allclose(log_probs, want_log_probs, rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(is_argmax, want_argmax)
    # some targets are the argmax: the flag is exercised both ways
    hits = targets.at[0, :3].set(jnp.argmax(hidden[0, :3] @ head, axis=-1))
    assert log_probs_in_chunks(hidden, head, hits, chunk_size)[1][0, :3].all()

    def loss(fn):
        return lambda h, w: jnp.sum(fn(h, w, targets)[0] * weights)

    got = jax.grad(loss(lambda h, w, t: log_probs_in_chunks(h, w, t, chunk_size)), argnums=(0, 1))(hidden, head)
    want = jax.grad(loss(_whole_log_probs), argnums=(0, 1))(hidden, head)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _whole_logits_nll(cfg, params, batch):
    """The training loss as it was computed before chunking: whole logits, then `token_nll`."""
    logits, _ = transformer.apply(cfg, params, batch["inputs"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])
    mask = batch["loss_mask"]
    return jnp.sum(token_nll(logits, batch["targets"]) * mask), jnp.sum(mask)


def _batch(cfg, rows, length, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (rows, length + 1)).astype(np.int32)
    cut = length // 3
    idx = np.arange(length)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.broadcast_to(np.where(idx < cut, 1, 2), (rows, length)).astype(np.int32),
            "positions": np.broadcast_to(np.where(idx < cut, idx, idx - cut), (rows, length)).astype(np.int32),
            "loss_mask": (rng.random((rows, length)) > 0.2).astype(np.float32)}


@pytest.mark.parametrize("tie", [False, True])
def test_training_loss_and_every_gradient_equal_the_whole_logits_loss(tiny_config, tie):
    cfg = tiny_config.replace(loss_chunk_size=4, tie_embeddings=tie)
    params = api.init_params(cfg, seed=2)
    batch = _batch(cfg, rows=2, length=16)
    (nll, count), grads = jax.jit(jax.value_and_grad(lambda p: batch_nll(cfg, p, batch), has_aux=True))(params)
    (want_nll, want_count), want_grads = jax.jit(jax.value_and_grad(
        lambda p: _whole_logits_nll(cfg, p, batch), has_aux=True))(params)
    assert count == want_count
    np.testing.assert_allclose(nll, want_nll, rtol=TOL)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        scale = float(jnp.max(jnp.abs(w)))
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-5 * scale, jax.tree_util.keystr(path)


# Memory: vocab much larger than length, so [length, vocab] logits dominate everything that grows with
# length (the `xla` attention's [heads, length, length] scores included).
MEMORY_MODEL = dict(vocab_size=32768, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden_dim=32,
                    max_seq_len=512, dtype="float32", attention_impl="xla")
SHORT, LONG = 128, 512


def _temp_bytes(cfg: ModelConfig, length: int) -> int:
    params = jax.eval_shape(lambda: api.init_params(cfg))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(cfg, rows=1, length=length))
    grad = jax.jit(jax.grad(lambda p, b: batch_nll(cfg, p, b)[0]))
    return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


def test_train_step_memory_does_not_grow_with_length_times_vocab():
    """XLA:CPU's temporaries of the loss gradient at two lengths. Whole logits (one chunk: the control)
    grow by several [Δlength, vocab] fp32 arrays (logits, softmax, their gradient); 64-position chunks
    by less than a quarter of one."""
    logits_growth = (LONG - SHORT) * MEMORY_MODEL["vocab_size"] * 4
    whole = ModelConfig(**MEMORY_MODEL, loss_chunk_size=LONG)
    chunked = ModelConfig(**MEMORY_MODEL, loss_chunk_size=64)
    whole_growth = _temp_bytes(whole, LONG) - _temp_bytes(whole, SHORT)
    chunked_growth = _temp_bytes(chunked, LONG) - _temp_bytes(chunked, SHORT)
    print(f"temp bytes growth {SHORT}->{LONG}: whole logits {whole_growth:,}, chunked {chunked_growth:,}, "
          f"one [Δlength, vocab] fp32 array {logits_growth:,}")
    assert whole_growth >= 2 * logits_growth
    assert chunked_growth < logits_growth / 4
