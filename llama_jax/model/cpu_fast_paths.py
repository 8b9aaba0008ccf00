"""XLA:CPU fast paths: the model's few operations that XLA:CPU runs slowly in their plain form, each
given a CPU-only variant with the same result. Nothing else in the model knows about the CPU.

Every function here computes exactly what its plain form (`plain_*`) computes. A program traced for a
GPU or TPU (on one, or under an abstract mesh of them: `parallel.platform`) gets the plain form only: no
trace of this module's variants. Traced for a CPU, it gets `lax.platform_dependent(cpu=variant, default=plain)`, resolved when the program is compiled: the
CPU runs the variant, and the same program exported from a CPU for a GPU or TPU still runs the plain
form there. The variants run under the named scope `xla_cpu_fast_path`, so a lowered program shows
whether it holds any (tests/test_cpu_fast_paths.py). `LLAMA_JAX_CPU_FAST_PATHS=0` turns them all off
(read when a function is traced), e.g. to measure what they buy.

- `matmul`: autodiff's gradients of a product read its operands transposed (the weight gradient
  x.T @ dy). XLA:CPU has no bf16 kernel for transposed operands and runs those products in fp32 on
  upcast copies, ~4x slower than on a row-major copy of the transpose; the CPU VJP makes those copies
  (the training benchmark's M bf16 step: ~800 -> ~1,300 tokens/s; see bench/RESULTS.md).
- `target_logit`: the loss's gather of each target's logit. Its autodiff gradient is a scatter into a
  zeroed [batch, length, vocab] array; the CPU VJP is an elementwise select that fuses with the
  softmax's gradient (+4% tokens/s on the M bf16 step).
- `grouped_query_products`: attention's two products with each kv head's query group folded into the
  query axis, so both are rank-4 batched matmuls (XLA:CPU runs these ~2x faster than the rank-5
  grouped form).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from llama_jax.parallel.platform import target_platform

SCOPE = "xla_cpu_fast_path"
SWITCH = "LLAMA_JAX_CPU_FAST_PATHS"


def enabled() -> bool:
    """The switch: on unless LLAMA_JAX_CPU_FAST_PATHS=0, and only when tracing for a CPU (the host's
    backend, or the devices of the mesh in context: see `parallel.platform`)."""
    return os.environ.get(SWITCH, "1") != "0" and target_platform() == "cpu"


def _on_cpu(fast, plain, *args):
    """`fast(*args)` where the program runs on a CPU, `plain(*args)` elsewhere (see the module docstring)."""
    if not enabled():
        return plain(*args)

    def scoped(*a):
        with jax.named_scope(SCOPE):
            return fast(*a)

    return jax.lax.platform_dependent(*args, cpu=scoped, default=plain)


# ------------------------------------------------------------------------------------------ products


def plain_matmul(a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """a @ b over the last two axes ([..., m, k] @ [..., k, n]), the result in `out_dtype`."""
    return jnp.matmul(a, b, preferred_element_type=out_dtype)


def _row_major_transpose(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, written out row-major (XLA folds a plain transpose into the
    product that reads it; a reshape through a unit axis it does not fold)."""
    *batch, m, k = x.shape
    return jnp.swapaxes(x.reshape(*batch, m, k, 1), -3, -1).reshape(*batch, k, m)


def _transpose_for_dot(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, as a product's operand; materialised below fp32."""
    return jnp.matrix_transpose(x) if x.dtype == jnp.float32 else _row_major_transpose(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_matmul(a, b, out_dtype):
    return plain_matmul(a, b, out_dtype)


def _cpu_matmul_fwd(a, b, out_dtype):
    return plain_matmul(a, b, out_dtype), (a, b)


def _cpu_matmul_bwd(out_dtype, residuals, dy):
    """Gradients in the operands' types, through row-major transposed copies of the smaller arrays (a
    weight or a head's keys rather than a [queries, keys] block of attention weights)."""
    a, b = residuals
    dy = dy.astype(a.dtype)
    da = jnp.matmul(dy, _transpose_for_dot(b), preferred_element_type=a.dtype)
    if a.size <= dy.size + b.size:
        db = jnp.matmul(_transpose_for_dot(a), dy, preferred_element_type=b.dtype)
    else:  # a is the large side (attention weights): transpose the two smaller arrays instead
        db = _transpose_for_dot(jnp.matmul(_transpose_for_dot(dy), a, preferred_element_type=b.dtype))
    return da, db


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """`plain_matmul`, whose gradients stay on XLA:CPU's bf16 fast path on the CPU."""
    return _on_cpu(lambda a, b: _cpu_matmul(a, b, out_dtype), lambda a, b: plain_matmul(a, b, out_dtype), a, b)


# ------------------------------------------------------------------------------------- target logit


def plain_target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[..., targets]: [batch, length, vocab] and [batch, length] -> [batch, length]."""
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@jax.custom_vjp
def _cpu_target_logit(logits, targets):
    return plain_target_logit(logits, targets)


def _cpu_target_logit_fwd(logits, targets):
    return plain_target_logit(logits, targets), (targets, logits.shape[-1])


def _cpu_target_logit_bwd(residuals, grad):
    targets, vocab_size = residuals
    is_target = jnp.arange(vocab_size, dtype=targets.dtype) == targets[..., None]
    return jnp.where(is_target, grad[..., None], 0.0).astype(grad.dtype), None


_cpu_target_logit.defvjp(_cpu_target_logit_fwd, _cpu_target_logit_bwd)


def target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`plain_target_logit`, whose gradient on the CPU is a select rather than a scatter."""
    return _on_cpu(_cpu_target_logit, plain_target_logit, logits, targets)


# ------------------------------------------------------------------------ grouped-query attention


def plain_grouped_query_products(q, k, v, mask):
    """Masked softmax attention with kv heads serving query groups, in fp32, K/V never repeated.

    q [batch, q_len, heads, d], k/v [batch, kv_len, kv_heads, d], mask [batch or 1, 1, q_len, kv_len].
    Returns the unnormalised-for-padding output [batch, kv_heads, group, q_len, d] in fp32 and the mask
    broadcast to [batch or 1, 1, 1, q_len, kv_len].
    """
    batch, q_len, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    group = n_heads // n_kv_heads
    q_grouped = q.reshape(batch, q_len, n_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_grouped, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / head_dim ** 0.5)
    mask = mask[:, :, None]
    weights = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->bkgtd", weights, v, preferred_element_type=jnp.float32)
    return out, mask


def _folded_grouped_query_products(q, k, v, mask):
    """The same with each group folded into the query axis: two rank-4 products through `matmul`."""
    batch, q_len, n_heads, head_dim = q.shape
    kv_len, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    q_folded = (q.reshape(batch, q_len, n_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
                .reshape(batch, n_kv_heads, group * q_len, head_dim))
    scores = _cpu_matmul(q_folded, k.transpose(0, 2, 3, 1), jnp.float32)
    scores = scores.reshape(batch, n_kv_heads, group, q_len, kv_len) * (1.0 / head_dim ** 0.5)
    mask = mask[:, :, None]
    weights = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    weights = weights.reshape(batch, n_kv_heads, group * q_len, kv_len).astype(v.dtype)
    out = _cpu_matmul(weights, v.transpose(0, 2, 1, 3), jnp.float32)
    return out.reshape(batch, n_kv_heads, group, q_len, head_dim), mask


def grouped_query_products(q, k, v, mask):
    """`plain_grouped_query_products`, folded into rank-4 products on the CPU."""
    return _on_cpu(_folded_grouped_query_products, plain_grouped_query_products, q, k, v, mask)
