"""What the GPU and TPU flash-attention kernels share: input checks, block sizes and padding, the causal
block bounds, the per-block math, the cost estimate and the `custom_vjp` wiring.

The two backends differ only in how blocks reach the math: the GPU kernel (Triton) loops over key or
query blocks inside one program, the TPU kernel (Mosaic) walks a triangular grid that the pipeline
emitter feeds block by block. Both take their loop bounds or grid from the functions here, so the
block-skipping rule exists once and the cost estimate is computed from the very bounds the kernels use.

Conventions inside the kernels: scores live in the log2 domain (scaled by log2(e)/sqrt(D)) so the
softmax uses `exp2`; the saved per-row statistic is that log2-domain log-sum-exp, +inf for a row whose
keys are all masked (its probabilities then come out exactly 0 in the backward pass).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
# Running max starts at a finite floor: a row whose keys are all masked so far keeps m = floor, its
# masked scores are -inf, exp2(-inf - floor) = 0, and no inf - inf ever produces NaN.
ROW_MAX_FLOOR = -0.5 * float(jnp.finfo(jnp.float32).max)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ----------------------------------------------------------------------------------------- checks


def check_inputs(q, k, v, segment_ids) -> None:
    """Reject bad shapes/dtypes with a message naming the argument, before anything is traced."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"flash attention: {name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"flash attention: {name}.dtype={x.dtype}; expected one of float32, bfloat16, float16")
    if k.shape != v.shape:
        raise ValueError(f"flash attention: k.shape={k.shape} != v.shape={v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    batch, seq, heads, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(
            f"flash attention: k/v shape {k.shape} does not match q shape {q.shape} in batch, seq or "
            f"head_dim (the kernels need q_len == kv_len; KV-cache decoding uses the xla reference)")
    if heads % k.shape[2]:
        raise ValueError(f"flash attention: n_heads={heads} is not a multiple of n_kv_heads={k.shape[2]}")
    if segment_ids is not None:
        if segment_ids.shape != (batch, seq):
            raise ValueError(f"flash attention: segment_ids.shape={segment_ids.shape}; expected {(batch, seq)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"flash attention: segment_ids.dtype={segment_ids.dtype}; expected an integer dtype")


def check_block(name: str, value: int, multiple_of: int) -> None:
    """Block sizes must be positive multiples of the backend's tile (16 for tl.dot, 8 sublanes on TPU)."""
    if not isinstance(value, int) or value <= 0 or value % multiple_of:
        raise ValueError(f"flash attention: {name}={value!r}; expected a positive multiple of {multiple_of}")


# ------------------------------------------------------------------------------------ block plan


class Blocks(NamedTuple):
    """Block sizes of one call, per kernel (requested sizes, shrunk for short sequences).

    Each backward kernel holds one block and streams the other: dK/dV holds a key block and streams
    query blocks, dQ the reverse, so each has its own pair.
    """

    q: int
    k: int
    q_dkdv: int
    k_dkdv: int
    q_dq: int
    k_dq: int


class Geometry(NamedTuple):
    """Sizes of one (padded) call: queries [batch, seq, heads, head_dim], kv heads serving `group` each."""

    batch: int
    seq: int
    heads: int
    head_dim: int
    group: int


def geometry(q, k) -> Geometry:
    batch, seq, heads, head_dim = q.shape
    return Geometry(batch, seq, heads, head_dim, heads // k.shape[2])


BLOCK_NAMES = ("block_q", "block_k", "block_q_dkdv", "block_k_dkdv", "block_q_dq", "block_k_dq")


def fit_block(requested: int, seq_len: int, align: int) -> int:
    """Shrink a block to the sequence rounded up to `align`, so short sequences do not pay a full block.

    Halving keeps the block a multiple of `align`, and a power of two stays a power of two (Triton).
    """
    fitted = requested
    while fitted % (2 * align) == 0 and fitted // 2 >= seq_len:
        fitted //= 2
    return fitted


def plan_blocks(seq_len: int, requested: Blocks, align: int) -> tuple[Blocks, int]:
    """Fitted block sizes and the padded sequence length (a multiple of every block)."""
    blocks = Blocks(*(fit_block(b, seq_len, align) for b in requested))
    step = math.lcm(*blocks)
    return blocks, -(-seq_len // step) * step


# ---------------------------------------------------------------------------- causal block bounds
# Block (i, j) pairs query rows [i*bq, (i+1)*bq) with key rows [j*bk, (j+1)*bk). It is needed iff its
# last query sees its first key, and fully visible (no mask needed) iff its first query sees its last
# key. These work on Python ints (grids, tables, cost) and on traced ints (in-kernel loop bounds).


def key_blocks_for_query_block(i, block_q: int, block_k: int):
    """(n_full, n_needed): key blocks [0, n_full) are fully visible, [n_full, n_needed) are partial."""
    n_needed = ((i + 1) * block_q + block_k - 1) // block_k
    n_full = (i * block_q + 1) // block_k
    return n_full, n_needed


def query_blocks_for_key_block(j, block_q: int, block_k: int, n_q_blocks: int):
    """(first, first_full): query blocks [first, first_full) are partial, [first_full, n_q_blocks) full."""
    first = (j * block_k) // block_q
    first_full = ((j + 1) * block_k - 1 + block_q - 1) // block_q
    if isinstance(first_full, int):
        first_full = min(first_full, n_q_blocks)
    else:
        first_full = jnp.minimum(first_full, n_q_blocks)
    return first, first_full


def visited_pairs(seq_len: int, block_q: int, block_k: int) -> int:
    """Number of (query block, key block) pairs a causal kernel visits: T_b(T_b+1)/2 when bq == bk."""
    return sum(key_blocks_for_query_block(i, block_q, block_k)[1] for i in range(seq_len // block_q))


def cost_estimate(batch: int, heads: int, seq_len: int, head_dim: int, block_q: int, block_k: int,
                  itemsize: int, matmuls: int) -> pl.CostEstimate:
    """FLOPs, exps and bytes of one kernel, counted over the visited block pairs only.

    `matmuls` is the number of [bq, bk, D] products per pair: 2 forward, 4 for dK/dV, 3 for dQ.
    Bytes: each pair streams one key-side block (K and V) and the query-side tensors move once.
    """
    pairs = batch * heads * visited_pairs(seq_len, block_q, block_k)
    flops = 2 * matmuls * block_q * block_k * head_dim * pairs
    streamed = pairs * 2 * block_k * head_dim * itemsize
    once = batch * heads * seq_len * (2 * head_dim * itemsize + 4)
    return pl.CostEstimate(flops=flops, transcendentals=pairs * block_q * block_k, bytes_accessed=streamed + once)


# ------------------------------------------------------------------------------ per-block math


def block_mask(row_start, col_start, n_rows: int, n_cols: int, row_seg, col_seg, causal: bool,
               rows_are_keys: bool = False):
    """[rows, cols] visibility of one block: causal (if it straddles the diagonal) and same document.

    Rows are queries and columns keys, or the reverse with `rows_are_keys` (the dK/dV kernel works on
    transposed scores). row_seg / col_seg are the block's segment ids shaped [rows, 1] / [1, cols], or
    None without segments; id 0 (padding) sees nothing. Returns None when nothing needs masking.
    """
    mask = None
    if causal:
        rows = row_start + lax.broadcasted_iota(jnp.int32, (n_rows, n_cols), 0)
        cols = col_start + lax.broadcasted_iota(jnp.int32, (n_rows, n_cols), 1)
        mask = (rows <= cols) if rows_are_keys else (cols <= rows)
    if row_seg is not None:
        same = (row_seg == col_seg) & (row_seg != 0)
        mask = same if mask is None else mask & same
    return mask


def dot_precision(dtype):
    """fp32 inputs get true fp32 products (Triton would use TF32 by default); 16-bit inputs go as they are."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b, contract_a: int, contract_b: int):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           precision=dot_precision(a.dtype), preferred_element_type=jnp.float32)


def _col(stat):
    """A per-query statistic as a column: [rows] (GPU) or [rows, 1] (TPU) against [rows, cols]."""
    return stat[:, None] if stat.ndim == 1 else stat


def _row(stat):
    """A per-query statistic as a row: [cols] (GPU) or [1, cols] (TPU) against transposed [rows, cols]."""
    return stat[None, :] if stat.ndim == 1 else stat


def log2_scores(q, k, mask, qk_scale: float):
    """q @ k.T in fp32, scaled into the log2 domain, masked entries -inf."""
    s = _dot(q, k, 1, 1) * qk_scale
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def online_softmax_step(acc, m, l, q, k, v, mask, qk_scale: float):
    """One key block of the flash forward: rescale the running (acc, max m, sum l), add this block."""
    s = log2_scores(q, k, mask, qk_scale)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=m.ndim == 2))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - _col(m_new))
    l_new = l * alpha + jnp.sum(p, axis=1, keepdims=l.ndim == 2)
    acc_new = acc * _col(alpha) + _dot(p.astype(v.dtype), v, 1, 0)
    return acc_new, m_new, l_new


def finish_softmax(acc, m, l):
    """Normalised output (0 for a row with no visible key) and the log2-domain log-sum-exp (+inf there)."""
    empty = l == 0.0
    out = acc / _col(jnp.where(empty, 1.0, l))
    lse = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))
    return out, lse


def dkdv_step(dk, dv, q, k, v, do, lse, delta, mask_t, qk_scale: float):
    """Accumulate one query block into a key block's dK (unscaled) and dV.

    Works on transposed scores S^T = K Q^T [bk, bq] (mask_t in that orientation, lse/delta as rows),
    so every product is A @ B or A @ B^T and no probability tile is ever transposed.
    """
    s_t = _dot(k, q, 1, 1) * qk_scale
    if mask_t is not None:
        s_t = jnp.where(mask_t, s_t, -jnp.inf)
    p_t = jnp.exp2(s_t - _row(lse))
    dv = dv + _dot(p_t.astype(do.dtype), do, 1, 0)
    ds_t = p_t * (_dot(v, do, 1, 1) - _row(delta))
    dk = dk + _dot(ds_t.astype(q.dtype), q, 1, 0)
    return dk, dv


def dq_step(dq, q, k, v, do, lse, delta, mask, qk_scale: float):
    """Accumulate one key block into a query block's dQ (unscaled): P from the saved lse, dS = P (dP - delta)."""
    p = jnp.exp2(log2_scores(q, k, mask, qk_scale) - _col(lse))
    ds = p * (_dot(do, v, 1, 1) - _col(delta))
    return dq + _dot(ds.astype(k.dtype), k, 1, 0)


def split_refs(refs, n_seg: int, has_seg: bool, n_in: int, n_out: int, count: bool):
    """Kernel refs in pallas_call order, [segments] inputs outputs [count] scratch, with None for absent ones.

    Returns (segment refs (n_seg of them), input refs, output refs, count ref, scratch refs).
    """
    refs = list(refs)
    segs = tuple(refs.pop(0) for _ in range(n_seg)) if has_seg else (None,) * n_seg
    ins, outs, rest = refs[:n_in], refs[n_in:n_in + n_out], refs[n_in + n_out:]
    count_ref = rest.pop(0) if count else None
    return segs, ins, outs, count_ref, rest


# ------------------------------------------------------------------------------ custom_vjp wiring


@dataclasses.dataclass(frozen=True)
class Backend:
    """One kernel family: how it runs the forward and the backward, and the block alignment it needs.

    forward(q, k, v, seg, cfg) -> (out, residual, counts)
    backward(q, k, v, seg, delta, residual, d_out, cfg) -> (dq, dk, dv, counts_dkdv, counts_dq),
        delta = `output_grad_rowdot(out, d_out)`
    `counts` are None unless cfg.count_visits (a test-only mode that counts visited block pairs).
    """

    forward: Callable
    backward: Callable
    align: int


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static settings of one call (hashable: it is a `custom_vjp` non-differentiable argument)."""

    blocks: Blocks
    interpret: bool
    compiler: Any = None  # backend-specific compiler parameters (e.g. Triton num_warps/num_stages)
    count_visits: bool = False


def log2_scale(head_dim: int) -> float:
    """Softmax scale 1/sqrt(D) folded with log2(e), so kernels can use exp2."""
    return LOG2E / math.sqrt(head_dim)


def output_grad_rowdot(out, d_out):
    """delta[b, h, t] = Σ_d out·dO in fp32: the softmax backward's per-row term, shared by both backends."""
    return jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, segment_ids, backend: Backend, cfg: KernelConfig):
    return backend.forward(q, k, v, segment_ids, cfg)[0]


def _flash_fwd(q, k, v, segment_ids, backend, cfg):
    out, residual, _ = backend.forward(q, k, v, segment_ids, cfg)
    return out, (q, k, v, segment_ids, out, residual)


def _flash_bwd(backend, cfg, saved, d_out):
    q, k, v, segment_ids, out, residual = saved
    delta = output_grad_rowdot(out, d_out)
    dq, dk, dv, _, _ = backend.backward(q, k, v, segment_ids, delta, residual, d_out, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def prepare(q, k, v, segment_ids, requested: Blocks, align: int):
    """Check inputs, fit blocks and pad the sequence axis to a multiple of every block.

    Padded keys sit after every real query, so the causal mask already hides them; padded segment ids
    are 0 (padding). Returns the padded arrays, the block plan and the original length.
    """
    check_inputs(q, k, v, segment_ids)
    for name, value in zip(BLOCK_NAMES, requested):
        check_block(name, value, align)
    seq_len = q.shape[1]
    blocks, padded = plan_blocks(seq_len, requested, align)
    pad = padded - seq_len
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return (q, k, v, segment_ids), blocks, seq_len


def flash_attention(q, k, v, segment_ids, backend: Backend, requested: Blocks, interpret, compiler=None):
    """Causal GQA flash attention through `backend`, differentiable via the backend's backward kernels."""
    (q, k, v, segment_ids), blocks, seq_len = prepare(q, k, v, segment_ids, requested, backend.align)
    cfg = KernelConfig(blocks=blocks, interpret=interpret, compiler=compiler)
    return _flash(q, k, v, segment_ids, backend, cfg)[:, :seq_len]


def requested_blocks(block_q: int, block_k: int, block_q_dkdv: int | None, block_k_dkdv: int | None,
                     block_q_dq: int | None, block_k_dq: int | None) -> Blocks:
    """Backward blocks left as None take the forward's sizes."""
    return Blocks(block_q, block_k,
                  block_q if block_q_dkdv is None else block_q_dkdv,
                  block_k if block_k_dkdv is None else block_k_dkdv,
                  block_q if block_q_dq is None else block_q_dq,
                  block_k if block_k_dq is None else block_k_dq)
