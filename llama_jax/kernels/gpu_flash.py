"""Causal flash attention for GPUs: Pallas kernels lowered through Triton, forward and backward.

Layout is the model's own, [batch, seq, heads, head_dim]: no transposes around the kernels. Each
program holds one block and loops over the other with `lax.fori_loop`, whose bounds come from the
causal rule in `common`: key blocks above the diagonal are never loaded. The loop runs in two phases,
the fully visible blocks without a mask and the few diagonal blocks with one.

- forward: grid (query block, batch, head), heaviest query blocks launched first; loops over key
  blocks [0, n_needed); writes the output and the per-row log-sum-exp.
- dK/dV:   grid (key block, batch, kv head); for each of the group's query heads, loops over query
  blocks [first, n_q): the group sum of dK/dV happens in registers, K/V are never repeated. It works
  on transposed scores K Q^T, so no probability tile is transposed between tensor-core products.
- dQ:      grid (query block, batch, head); loops over key blocks like the forward.

In a program that is not for a GPU the kernels run in Pallas' interpret mode (`interpret=None` picks it from
`parallel.platform.target_platform`, so a program lowered on a CPU machine for a GPU gets the Triton kernels).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from llama_jax.kernels import common
from llama_jax.kernels.common import Blocks, KernelConfig
from llama_jax.parallel.platform import target_platform

ALIGN = 16  # tl.dot needs every matrix dimension >= 16; blocks are powers of two
# fp32 inputs: every block at most 64. Their dots run IEEE fp32 (no tensor cores) on tiles twice the
# size of 16-bit ones; with 128-row blocks one jitted fwd+bwd took over 2 minutes to compile on an H200.
FP32_MAX_BLOCK = 64


def default_interpret() -> bool:
    return target_platform() != "gpu"


def _compiler_params(cfg: KernelConfig, head_dim: int):
    """num_warps / num_stages, each None = default: 4 warps up to head_dim 64, else 8; 3 pipeline stages.

    On an H200 at head_dim 128 (bench/attention.py --sweep): 4 warps made the backward 2.1x slower;
    3 backward stages instead of 2 took it from 9.1 to 7.8 ms (T = 4096, batch 8, 32 heads).
    """
    num_warps, num_stages = cfg.compiler
    if num_warps is None:
        num_warps = 4 if head_dim <= 64 else 8
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=3 if num_stages is None else num_stages)


def _causal_loop(ranges, body, carry, visits):
    """Run body(idx, carry, masked) over each (lo, hi, masked) range; count iterations if visits given."""
    for lo, hi, masked in ranges:
        def step(idx, state, masked=masked):
            inner, count = state
            return body(idx, inner, masked), (None if count is None else count + 1)
        carry, visits = lax.fori_loop(lo, hi, step, (carry, visits))
    return carry, visits


def _segments(seg_ref, start, size):
    return None if seg_ref is None else seg_ref[pl.ds(start, size)]


def _store_count(count_ref, visits):
    if count_ref is not None:
        count_ref[...] = jnp.full(count_ref.shape, visits, jnp.int32)


def _over_key_blocks(seg_ref, n_q: int, bq: int, bk: int, step, init, count: bool):
    """Run `step(key rows, carry, mask)` over the key blocks this program's query block needs (programs
    take query blocks heaviest first), unmasked blocks first; returns (carry, visits or None)."""
    i = n_q - 1 - pl.program_id(0)
    q_start = pl.multiple_of(i * bq, bq)
    q_seg = _segments(seg_ref, q_start, bq)
    q_seg = None if q_seg is None else q_seg[:, None]

    def body(j, carry, masked):
        k_start = pl.multiple_of(j * bk, bk)
        k_seg = _segments(seg_ref, k_start, bk)
        mask = common.block_mask(q_start, k_start, bq, bk, q_seg, None if k_seg is None else k_seg[None, :],
                                 causal=masked)
        return step(pl.ds(k_start, bk), carry, mask)

    n_full, n_needed = common.key_blocks_for_query_block(i, bq, bk)
    return _causal_loop(((0, n_full, False), (n_full, n_needed, True)), body, init, jnp.int32(0) if count else None)


# ------------------------------------------------------------------------------------------ forward


def _forward_kernel(*refs, blocks: Blocks, n_q: int, qk_scale: float, has_seg: bool, count: bool):
    (seg_ref,), ins, (o_ref, lse_ref), count_ref, _ = common.split_refs(refs, 1, has_seg, 3, 2, count)
    q_ref, k_ref, v_ref = ins
    bq, bk = blocks.q, blocks.k
    q = q_ref[...]

    def step(cols, carry, mask):
        return common.online_softmax_step(*carry, q, k_ref[cols, :], v_ref[cols, :], mask, qk_scale)

    head_dim = q.shape[-1]
    init = (jnp.zeros((bq, head_dim), jnp.float32), jnp.full((bq,), common.ROW_MAX_FLOOR, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    (acc, m, l), visits = _over_key_blocks(seg_ref, n_q, bq, bk, step, init, count)
    out, lse = common.finish_softmax(acc, m, l)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse
    _store_count(count_ref, visits)


def forward(q, k, v, segment_ids, cfg: KernelConfig):
    """Padded inputs -> (out [B,T,H,D], lse [B,H,T] fp32 log2-domain, counts [B,H,n_q] or None)."""
    batch, seq, heads, head_dim, group = common.geometry(q, k)
    bq, bk = cfg.blocks.q, cfg.blocks.k
    n_q, has_seg = seq // bq, segment_ids is not None
    kernel = functools.partial(_forward_kernel, blocks=cfg.blocks, n_q=n_q, qk_scale=common.log2_scale(head_dim),
                               has_seg=has_seg, count=cfg.count_visits)
    rev = lambda i: n_q - 1 - i  # noqa: E731  (longest rows first: less tail imbalance)
    in_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, rev(i), h, 0)),
        pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
        pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, rev(i), h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, rev(i))),
    ]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)]
    if cfg.count_visits:
        out_specs.append(pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, rev(i))))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, n_q), jnp.int32))
    args = (q, k, v)
    if has_seg:
        in_specs.insert(0, pl.BlockSpec((None, seq), lambda i, b, h: (b, 0)))
        args = (segment_ids,) + args
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n_q, batch, heads), in_specs=in_specs, out_specs=out_specs,
        compiler_params=_compiler_params(cfg, head_dim), interpret=cfg.interpret, name="flash_fwd_gpu",
        cost_estimate=common.cost_estimate(batch, heads, seq, head_dim, bq, bk, q.dtype.itemsize, 2),
    )(*args)
    return outs[0], outs[1], (outs[2] if cfg.count_visits else None)


# ----------------------------------------------------------------------------------------- backward


def _dkdv_kernel(*refs, blocks: Blocks, n_q: int, group: int, qk_scale: float, scale: float, has_seg: bool,
                 count: bool):
    (seg_ref,), ins, (dk_ref, dv_ref), count_ref, _ = common.split_refs(refs, 1, has_seg, 6, 2, count)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = blocks.q_dkdv, blocks.k_dkdv
    j = pl.program_id(0)
    k_start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[...], v_ref[...]
    k_seg = _segments(seg_ref, k_start, bk)
    k_seg = None if k_seg is None else k_seg[:, None]
    first, first_full = common.query_blocks_for_key_block(j, bq, bk, n_q)

    def per_head(g, state):
        def body(i, carry, masked):
            q_start = pl.multiple_of(i * bq, bq)
            q_seg = _segments(seg_ref, q_start, bq)
            mask_t = common.block_mask(k_start, q_start, bk, bq, k_seg, None if q_seg is None else q_seg[None, :],
                                       causal=masked, rows_are_keys=True)
            rows = pl.ds(q_start, bq)
            return common.dkdv_step(*carry, q_ref[rows, g, :], k, v, do_ref[rows, g, :], lse_ref[g, rows],
                                    delta_ref[g, rows], mask_t, qk_scale)

        return _causal_loop(((first, first_full, True), (first_full, n_q, False)), body, *state)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), visits = lax.fori_loop(0, group, per_head, ((zeros, zeros), jnp.int32(0) if count else None))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    _store_count(count_ref, visits)


def _dq_kernel(*refs, blocks: Blocks, n_q: int, qk_scale: float, scale: float, has_seg: bool, count: bool):
    (seg_ref,), ins, (dq_ref,), count_ref, _ = common.split_refs(refs, 1, has_seg, 6, 1, count)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = blocks.q_dq, blocks.k_dq
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def step(cols, dq, mask):
        return common.dq_step(dq, q, k_ref[cols, :], v_ref[cols, :], do, lse, delta, mask, qk_scale)

    dq, visits = _over_key_blocks(seg_ref, n_q, bq, bk, step, jnp.zeros(q.shape, jnp.float32), count)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    _store_count(count_ref, visits)


def backward(q, k, v, segment_ids, delta, lse, d_out, cfg: KernelConfig):
    """`Backend.backward` as two Triton programs: dK/dV per (key block, kv head), dQ per query block."""
    batch, seq, heads, head_dim, group = common.geometry(q, k)
    kv_heads, scale, qk_scale = heads // group, 1.0 / head_dim ** 0.5, common.log2_scale(head_dim)
    has_seg, count = segment_ids is not None, cfg.count_visits
    params = _compiler_params(cfg, head_dim)
    seg_args = (segment_ids,) if has_seg else ()
    seg_spec = [pl.BlockSpec((None, seq), lambda *g: (g[1], 0))] if has_seg else []

    # dK/dV: query-side tensors grouped by the kv head they share, [B, T, KV, G, D] and [B, KV, G, T].
    bq, bk = cfg.blocks.q_dkdv, cfg.blocks.k_dkdv
    q_grouped = q.reshape(batch, seq, kv_heads, group, head_dim)
    do_grouped = d_out.reshape(batch, seq, kv_heads, group, head_dim)
    grouped_spec = pl.BlockSpec((None, seq, None, group, head_dim), lambda j, b, h: (b, 0, h, 0, 0))
    key_spec = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    stat_spec = pl.BlockSpec((None, None, group, seq), lambda j, b, h: (b, h, 0, 0))
    out_specs = [key_spec, key_spec]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if count:
        out_specs.append(pl.BlockSpec((None, None, 1), lambda j, b, h: (b, h, j)))
        out_shape.append(jax.ShapeDtypeStruct((batch, kv_heads, seq // bk), jnp.int32))
    dkdv = pl.pallas_call(
        functools.partial(_dkdv_kernel, blocks=cfg.blocks, n_q=seq // bq, group=group, qk_scale=qk_scale,
                          scale=scale, has_seg=has_seg, count=count),
        out_shape=out_shape, grid=(seq // bk, batch, kv_heads),
        in_specs=seg_spec + [grouped_spec, key_spec, key_spec, grouped_spec, stat_spec, stat_spec],
        out_specs=out_specs, compiler_params=params, interpret=cfg.interpret, name="flash_dkdv_gpu",
        cost_estimate=common.cost_estimate(batch, heads, seq, head_dim, bq, bk, q.dtype.itemsize, 4),
    )(*seg_args, q_grouped, k, v, do_grouped, lse.reshape(batch, kv_heads, group, seq),
      delta.reshape(batch, kv_heads, group, seq))

    # dQ: one program per (query block, head), streaming key blocks like the forward.
    bq, bk = cfg.blocks.q_dq, cfg.blocks.k_dq
    n_q = seq // bq
    rev = lambda i: n_q - 1 - i  # noqa: E731
    query_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, rev(i), h, 0))
    kv_spec = pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, rev(i)))
    out_specs = [query_spec]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if count:
        out_specs.append(pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, rev(i))))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, n_q), jnp.int32))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, blocks=cfg.blocks, n_q=n_q, qk_scale=qk_scale, scale=scale,
                          has_seg=has_seg, count=count),
        out_shape=out_shape, grid=(n_q, batch, heads),
        in_specs=seg_spec + [query_spec, kv_spec, kv_spec, query_spec, row_spec, row_spec],
        out_specs=out_specs, compiler_params=params, interpret=cfg.interpret, name="flash_dq_gpu",
        cost_estimate=common.cost_estimate(batch, heads, seq, head_dim, bq, bk, q.dtype.itemsize, 3),
    )(*seg_args, q, k, v, d_out, lse, delta)
    return (dq[0], dkdv[0], dkdv[1], dkdv[2] if count else None, dq[1] if count else None)


BACKEND = common.Backend(forward=forward, backward=backward, align=ALIGN)


def flash_attention_gpu(q, k, v, segment_ids=None, *, block_q: int = 128, block_k: int = 128,
                        block_q_dkdv: int | None = 64, block_k_dkdv: int | None = 128,
                        block_q_dq: int | None = 128, block_k_dq: int | None = 32,
                        num_warps: int | None = None, num_stages: int | None = None,
                        interpret: bool | None = None):
    """Causal grouped-query flash attention on a GPU (Pallas/Triton); interpret mode where no GPU is.

    q [B, T, H, D], k/v [B, T, KV, D] (KV divides H), segment_ids [B, T] int or None (0 = padding).
    Returns [B, T, H, D] in q's dtype; differentiable. Block sizes are powers of two >= 16; backward
    blocks left None take the forward's; with fp32 inputs each is capped at `FP32_MAX_BLOCK`. Each
    backward kernel holds a wide block (128 rows, the one it accumulates into) and streams narrower
    ones. The defaults are, one by one, the fastest settings bench/attention.py --sweep tried on an H200
    (head_dim 128, bf16). num_warps / num_stages None: see `_compiler_params`.
    """
    requested = common.requested_blocks(block_q, block_k, block_q_dkdv, block_k_dkdv, block_q_dq, block_k_dq)
    for name, value in zip(common.BLOCK_NAMES, requested):
        if isinstance(value, int) and value & (value - 1):
            raise ValueError(f"flash_attention_gpu: {name}={value}; Triton needs a power of two")
    head_dim = q.shape[-1]
    if head_dim < ALIGN or head_dim & (head_dim - 1):
        raise ValueError(f"flash_attention_gpu: head_dim={head_dim}; Triton needs a power of two >= {ALIGN}")
    if jnp.dtype(q.dtype) == jnp.float32:
        requested = common.Blocks(*(min(b, FP32_MAX_BLOCK) if isinstance(b, int) else b for b in requested))
    if interpret is None:
        interpret = default_interpret()
    return common.flash_attention(q, k, v, segment_ids, BACKEND, requested, interpret,
                                  compiler=(num_warps, num_stages))
