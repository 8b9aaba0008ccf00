"""Causal flash attention for TPUs: Pallas kernels for Mosaic, forward and backward.

Interpret mode only, so far: no TPU was available to this project, so these kernels have only ever run
in Pallas' TPU interpret mode (`pltpu.InterpretParams`, which simulates HBM/VMEM and the DMA pipeline
on the CPU). They are written to Mosaic's rules (blocks [.., 8k, 128k or full]; per-row statistics
as [rows, 1] columns, or [1, cols] rows where the dK/dV kernel needs them along lanes; VMEM scratch
accumulators; scalar-prefetched grid tables) but have not been compiled by Mosaic.

Layout: heads-major [batch, heads, seq, head_dim], so a block's last two dims are (rows, head_dim).
Causal skipping is in the grid itself: instead of a square (query block, key block) grid whose upper
triangle idles, the innermost grid axis walks a table of only the needed pairs, prefetched into SMEM,
and the index maps read it. The pipeline therefore never fetches a masked key block and never runs a
step for one: the grid has T_blocks(T_blocks+1)/2 steps, not T_blocks^2.

- forward / dQ: grid (batch, head, pair) with pairs query-major; the query block stays resident while
  its key blocks stream, accumulators live in VMEM scratch.
- dK/dV:        grid (batch, kv head, pair, group member) with pairs key-major; the key block stays
  resident while the query blocks of every query head in the group stream, so dK/dV are summed over
  the group in the accumulator and K/V are never repeated. It works on transposed scores K Q^T.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llama_jax.kernels import common
from llama_jax.kernels.common import Blocks, KernelConfig
from llama_jax.parallel.platform import target_platform

ALIGN = 8  # sublane tile; lane-dense blocks (multiples of 128) are what the defaults use


def default_interpret() -> bool:
    return target_platform() != "tpu"


def _interpret(cfg: KernelConfig):
    # Unwritten memory reads as NaN, so an output element a kernel forgot to write cannot pass a test.
    return pltpu.InterpretParams(uninitialized_memory="nan") if cfg.interpret else False


def query_major_pairs(n_q: int, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(query block, key block) of every needed pair, query blocks outer: the forward and dQ grids."""
    pairs = [(i, j) for i in range(n_q) for j in range(common.key_blocks_for_query_block(i, block_q, block_k)[1])]
    return tuple(np.array(col, np.int32) for col in zip(*pairs))


def key_major_pairs(n_k: int, n_q: int, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(query block, key block) of every needed pair, key blocks outer: the dK/dV grid."""
    pairs = [(i, j) for j in range(n_k)
             for i in range(common.query_blocks_for_key_block(j, block_q, block_k, n_q)[0], n_q)]
    return tuple(np.array(col, np.int32) for col in zip(*pairs))


def _block_mask(seg_refs, row_block, col_block, n_rows: int, n_cols: int, masked: bool, rows_are_keys=False):
    """Mask of a [n_rows, n_cols] score block from the row-side [rows, 1] and column-side [1, cols] ids."""
    row_seg, col_seg = seg_refs
    return common.block_mask(row_block * n_rows, col_block * n_cols, n_rows, n_cols,
                             None if row_seg is None else row_seg[...], None if col_seg is None else col_seg[...],
                             causal=masked, rows_are_keys=rows_are_keys)


def _masked_or_not(needs_mask, step):
    """Run step(masked) under the right static mask: only diagonal blocks pay for the causal mask."""
    pl.when(needs_mask)(lambda: step(True))
    pl.when(jnp.logical_not(needs_mask))(lambda: step(False))


def _count_step(count_ref, first):
    if count_ref is not None:
        @pl.when(first)
        def _():
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

        count_ref[...] += 1


def _seg_specs(has_seg: bool, n_rows: int, n_cols: int, row_block, col_block):
    """Segment ids of the score block's rows as [B, T, 1] (sublanes) and of its columns as [B, 1, T] (lanes).

    row_block / col_block map the grid indices (and prefetched tables) to the block index on each side.
    """
    if not has_seg:
        return []
    return [pl.BlockSpec((None, n_rows, 1), lambda *a: (a[0], row_block(*a), 0)),
            pl.BlockSpec((None, 1, n_cols), lambda *a: (a[0], 0, col_block(*a)))]


def _seg_args(segment_ids):
    return () if segment_ids is None else (segment_ids[:, :, None], segment_ids[:, None, :])


def _count_out(count: bool, shape, index_map):
    return ([jax.ShapeDtypeStruct(shape, jnp.int32)], [pl.BlockSpec((None, None, 1, 1), index_map)]) if count \
        else ([], [])


def _query_major_pair(q_tab, k_tab, bq: int, bk: int):
    """(query block i, key block j) of this grid step, and i's (n_full, n_needed) key-block bounds."""
    p = pl.program_id(2)
    i, j = q_tab[p], k_tab[p]
    return (i, j, *common.key_blocks_for_query_block(i, bq, bk))


# ------------------------------------------------------------------------------------------ forward


def _forward_kernel(q_tab, k_tab, *refs, blocks: Blocks, qk_scale: float, has_seg: bool, count: bool):
    segs, (q_ref, k_ref, v_ref), (o_ref, lse_ref), count_ref, (acc_ref, m_ref, l_ref) = \
        common.split_refs(refs, 2, has_seg, 3, 2, count)
    bq, bk = blocks.q, blocks.k
    i, j, n_full, n_needed = _query_major_pair(q_tab, k_tab, bq, bk)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, common.ROW_MAX_FLOOR, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    def step(masked):
        acc_ref[...], m_ref[...], l_ref[...] = common.online_softmax_step(
            acc_ref[...], m_ref[...], l_ref[...], q_ref[...], k_ref[...], v_ref[...],
            _block_mask(segs, i, j, bq, bk, masked), qk_scale)

    _masked_or_not(j >= n_full, step)
    _count_step(count_ref, j == 0)

    @pl.when(j == n_needed - 1)
    def _finish():
        out, lse = common.finish_softmax(acc_ref[...], m_ref[...], l_ref[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def forward(q, k, v, segment_ids, cfg: KernelConfig):
    """Padded [B,T,H,D] inputs -> (out [B,T,H,D], lse [B,H,T,1] fp32 log2-domain, counts [B,H,n_q] or None)."""
    batch, seq, heads, head_dim, group = common.geometry(q, k)
    bq, bk = cfg.blocks.q, cfg.blocks.k
    n_q, has_seg = seq // bq, segment_ids is not None
    q_tab, k_tab = query_major_pairs(n_q, bq, bk)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    row = lambda b, h, p, qs, ks: (b, h, qs[p], 0)  # noqa: E731
    key = lambda b, h, p, qs, ks: (b, h // group, ks[p], 0)  # noqa: E731
    count_shape, count_spec = _count_out(cfg.count_visits, (batch, heads, n_q, 1), row)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, heads, len(q_tab)),
        in_specs=_seg_specs(has_seg, bq, bk, lambda b, h, p, qs, ks: qs[p], lambda b, h, p, qs, ks: ks[p]) + [
            pl.BlockSpec((None, None, bq, head_dim), row),
            pl.BlockSpec((None, None, bk, head_dim), key),
            pl.BlockSpec((None, None, bk, head_dim), key)],
        out_specs=[pl.BlockSpec((None, None, bq, head_dim), row), pl.BlockSpec((None, None, bq, 1), row)]
        + count_spec,
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, 1), jnp.float32)])
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, blocks=cfg.blocks, qk_scale=common.log2_scale(head_dim),
                          has_seg=has_seg, count=cfg.count_visits),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq, 1), jnp.float32)] + count_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(cfg), name="flash_fwd_tpu",
        cost_estimate=common.cost_estimate(batch, heads, seq, head_dim, bq, bk, q.dtype.itemsize, 2),
    )(jnp.asarray(q_tab), jnp.asarray(k_tab), *_seg_args(segment_ids), qt, kt, vt)
    counts = outs[2][..., 0] if cfg.count_visits else None
    return outs[0].transpose(0, 2, 1, 3), outs[1], counts


# ----------------------------------------------------------------------------------------- backward


def _dkdv_kernel(q_tab, k_tab, *refs, blocks: Blocks, n_q: int, group: int, qk_scale: float, scale: float,
                 has_seg: bool, count: bool):
    segs, ins, (dk_ref, dv_ref), count_ref, (dk_acc, dv_acc) = common.split_refs(refs, 2, has_seg, 6, 2, count)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = blocks.q_dkdv, blocks.k_dkdv
    p, g = pl.program_id(2), pl.program_id(3)
    i, j = q_tab[p], k_tab[p]
    first, first_full = common.query_blocks_for_key_block(j, bq, bk, n_q)
    start = (i == first) & (g == 0)

    @pl.when(start)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked):
        dk_acc[...], dv_acc[...] = common.dkdv_step(
            dk_acc[...], dv_acc[...], q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
            delta_ref[...], _block_mask(segs, j, i, bk, bq, masked, rows_are_keys=True), qk_scale)

    _masked_or_not(i < first_full, step)
    _count_step(count_ref, start)

    @pl.when((i == n_q - 1) & (g == group - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(q_tab, k_tab, *refs, blocks: Blocks, qk_scale: float, scale: float, has_seg: bool, count: bool):
    segs, ins, (dq_ref,), count_ref, (dq_acc,) = common.split_refs(refs, 2, has_seg, 6, 1, count)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = blocks.q_dq, blocks.k_dq
    i, j, n_full, n_needed = _query_major_pair(q_tab, k_tab, bq, bk)

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def step(masked):
        dq_acc[...] = common.dq_step(dq_acc[...], q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
                                     delta_ref[...], _block_mask(segs, i, j, bq, bk, masked), qk_scale)

    _masked_or_not(j >= n_full, step)
    _count_step(count_ref, j == 0)

    @pl.when(j == n_needed - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


def backward(q, k, v, segment_ids, delta, lse, d_out, cfg: KernelConfig):
    """`Backend.backward` as two Mosaic programs over triangular grids: dK/dV key-major, dQ query-major."""
    batch, seq, heads, head_dim, group = common.geometry(q, k)
    kv_heads, scale, qk_scale = heads // group, 1.0 / head_dim ** 0.5, common.log2_scale(head_dim)
    has_seg, count = segment_ids is not None, cfg.count_visits
    interpret = _interpret(cfg)
    qt, kt, vt, dot = (x.transpose(0, 2, 1, 3) for x in (q, k, v, d_out))
    delta = delta[..., None]
    seg_args = _seg_args(segment_ids)
    dims = ("parallel", "parallel", "arbitrary")

    # dK/dV: grid (batch, kv head, key-major pair, group member).
    bq, bk = cfg.blocks.q_dkdv, cfg.blocks.k_dkdv
    n_q, n_k = seq // bq, seq // bk
    q_tab, k_tab = key_major_pairs(n_k, n_q, bq, bk)
    query = lambda b, h, p, g, qs, ks: (b, h * group + g, qs[p], 0)  # noqa: E731
    query_lanes = lambda b, h, p, g, qs, ks: (b, h * group + g, 0, qs[p])  # noqa: E731
    key = lambda b, h, p, g, qs, ks: (b, h, ks[p], 0)  # noqa: E731
    q_spec, k_spec = pl.BlockSpec((None, None, bq, head_dim), query), pl.BlockSpec((None, None, bk, head_dim), key)
    stat_spec = pl.BlockSpec((None, None, 1, bq), query_lanes)  # lse / delta as rows: [B, H, 1, T]
    count_shape, count_spec = _count_out(count, (batch, kv_heads, n_k, 1), key)
    dkdv = pl.pallas_call(
        functools.partial(_dkdv_kernel, blocks=cfg.blocks, n_q=n_q, group=group, qk_scale=qk_scale, scale=scale,
                          has_seg=has_seg, count=count),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(batch, kv_heads, len(q_tab), group),
            in_specs=_seg_specs(has_seg, bk, bq, lambda b, h, p, g, qs, ks: ks[p],
                                lambda b, h, p, g, qs, ks: qs[p])
            + [q_spec, k_spec, k_spec, q_spec, stat_spec, stat_spec],
            out_specs=[k_spec, k_spec] + count_spec,
            scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)] + count_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=dims + ("arbitrary",)),
        interpret=interpret, name="flash_dkdv_tpu",
        cost_estimate=common.cost_estimate(batch, heads, seq, head_dim, bq, bk, q.dtype.itemsize, 4),
    )(jnp.asarray(q_tab), jnp.asarray(k_tab), *seg_args, qt, kt, vt, dot, lse.reshape(batch, heads, 1, seq),
      delta.reshape(batch, heads, 1, seq))

    # dQ: grid (batch, head, query-major pair), like the forward.
    bq, bk = cfg.blocks.q_dq, cfg.blocks.k_dq
    n_q = seq // bq
    q_tab, k_tab = query_major_pairs(n_q, bq, bk)
    query = lambda b, h, p, qs, ks: (b, h, qs[p], 0)  # noqa: E731
    key = lambda b, h, p, qs, ks: (b, h // group, ks[p], 0)  # noqa: E731
    q_spec, k_spec = pl.BlockSpec((None, None, bq, head_dim), query), pl.BlockSpec((None, None, bk, head_dim), key)
    stat_spec = pl.BlockSpec((None, None, bq, 1), query)
    count_shape, count_spec = _count_out(count, (batch, heads, n_q, 1), query)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, blocks=cfg.blocks, qk_scale=qk_scale, scale=scale, has_seg=has_seg,
                          count=count),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(batch, heads, len(q_tab)),
            in_specs=_seg_specs(has_seg, bq, bk, lambda b, h, p, qs, ks: qs[p], lambda b, h, p, qs, ks: ks[p])
            + [q_spec, k_spec, k_spec, q_spec, stat_spec, stat_spec],
            out_specs=[q_spec] + count_spec,
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype)] + count_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=dims),
        interpret=interpret, name="flash_dq_tpu",
        cost_estimate=common.cost_estimate(batch, heads, seq, head_dim, bq, bk, q.dtype.itemsize, 3),
    )(jnp.asarray(q_tab), jnp.asarray(k_tab), *seg_args, qt, kt, vt, dot, lse, delta)
    back = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    return (back(dq[0]), back(dkdv[0]), back(dkdv[1]), dkdv[2][..., 0] if count else None,
            dq[1][..., 0] if count else None)


BACKEND = common.Backend(forward=forward, backward=backward, align=ALIGN)


def flash_attention_tpu(q, k, v, segment_ids=None, *, block_q: int = 512, block_k: int = 512,
                        block_q_dkdv: int | None = 256, block_k_dkdv: int | None = 512,
                        block_q_dq: int | None = 512, block_k_dq: int | None = 256,
                        interpret: bool | None = None):
    """Causal grouped-query flash attention for TPUs (Pallas/Mosaic); so far run only in interpret mode.

    q [B, T, H, D], k/v [B, T, KV, D] (KV divides H), segment_ids [B, T] int or None (0 = padding).
    Returns [B, T, H, D] in q's dtype; differentiable. Block sizes are multiples of 8 (128 or more for
    real TPUs); backward blocks left None take the forward's. interpret None: interpret unless the
    program is for a TPU (`parallel.platform.target_platform`: a real TPU, or an abstract mesh of TPUs).
    """
    requested = common.requested_blocks(block_q, block_k, block_q_dkdv, block_k_dkdv, block_q_dq, block_k_dq)
    if interpret is None:
        interpret = default_interpret()
    return common.flash_attention(q, k, v, segment_ids, BACKEND, requested, bool(interpret))
