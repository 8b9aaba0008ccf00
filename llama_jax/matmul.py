"""Matrix products whose gradients XLA:CPU computes at full speed in bf16.

Autodiff's gradients of a product read its operands transposed (the weight gradient x.T @ dy contracts
both over the token axis). XLA:CPU has no bf16 kernel for transposed operands and runs those products
in fp32 on upcast copies: ~200 GFLOP/s here against ~900 for the same product on a row-major copy of
the transpose. `matmul`'s VJP makes those copies (on the CPU, below fp32: the training benchmark's M
bf16 step went from ~800 to ~1,300 tokens/s; see bench/RESULTS.md); elsewhere its products are
autodiff's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _row_major_transpose(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, written out row-major (XLA folds a plain transpose into the
    product that reads it)."""
    *batch, m, k = x.shape
    return jnp.swapaxes(x.reshape(*batch, m, k, 1), -3, -1).reshape(*batch, k, m)


def _transpose_for_dot(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, as a product's operand; materialised on the CPU below fp32."""
    if x.dtype == jnp.float32:
        return jnp.matrix_transpose(x)
    return jax.lax.platform_dependent(x, cpu=_row_major_transpose, default=jnp.matrix_transpose)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """a @ b over the last two axes ([..., m, k] @ [..., k, n]).

    `out_dtype`: the product's type (e.g. fp32 scores from bf16 operands); the gradients come back in
    the operands' types. The VJP transposes the smaller arrays (a weight or a head's keys rather than a
    [queries, keys] block of attention weights).
    """
    return jnp.matmul(a, b, preferred_element_type=out_dtype)


def _matmul_fwd(a, b, out_dtype):
    return matmul(a, b, out_dtype), (a, b)


def _matmul_bwd(out_dtype, residuals, dy):
    a, b = residuals
    dy = dy.astype(a.dtype)
    da = jnp.matmul(dy, _transpose_for_dot(b), preferred_element_type=a.dtype)
    if a.size <= dy.size + b.size:
        db = jnp.matmul(_transpose_for_dot(a), dy, preferred_element_type=b.dtype)
    else:  # a is the large side (attention weights): transpose the two smaller arrays instead
        db = _transpose_for_dot(jnp.matmul(_transpose_for_dot(dy), a, preferred_element_type=b.dtype))
    return da, db


matmul.defvjp(_matmul_fwd, _matmul_bwd)
