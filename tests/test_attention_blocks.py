"""Long sequences run the reference attention in query blocks: the same result as one piece (the
reference `xla_attention` itself, the oracle), values and gradients, in a fraction of the memory."""
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model.attention import QUERY_BLOCK, attention, xla_attention

T = 3 * QUERY_BLOCK


def _inputs(q_len, kv_len):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, q_len, 4, 16))
    k, v = (jax.random.normal(key, (2, kv_len, 2, 16)) for key in keys[1:])
    segments = np.ones((2, kv_len), np.int32)
    segments[0, :100] = 0  # left padding
    segments[1, 700:] = 2  # a second document
    segments[1, -50:] = 0  # right padding
    return q, k, v, jnp.asarray(segments)


def test_blocked_attention_equals_the_reference_in_one_piece():
    q, k, v, segments = _inputs(T, T)
    np.testing.assert_allclose(attention(q, k, v, segments, impl="xla"), xla_attention(q, k, v, segments),
                               atol=2e-6, rtol=0)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, segments)))  # noqa: E731
    blocked = jax.grad(loss(lambda *a: attention(*a, impl="xla")), argnums=(0, 1, 2))(q, k, v)
    whole = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(blocked, whole):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # Queries after a KV cache's first QUERY_BLOCK slots (prefilling a long prompt).
    q, k, v, segments = _inputs(T, T + QUERY_BLOCK)
    np.testing.assert_allclose(attention(q, k, v, segments, q_offset=QUERY_BLOCK),
                               xla_attention(q, k, v, segments, q_offset=QUERY_BLOCK), atol=2e-6, rtol=0)


def test_blocked_attention_needs_a_fraction_of_the_memory():
    args = _inputs(T, T)
    temp = {fn: jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
            for fn in (attention, xla_attention)}
    assert temp[attention] <= 0.5 * temp[xla_attention], temp
