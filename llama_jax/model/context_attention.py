"""Attention over a sequence split across devices (context parallelism), in one `shard_map`.

Each device holds its slots of the balanced layout (`llama_jax.parallel.context`: two mirrored chunks)
for its batch rows and kv heads. Two ways to give every query all the keys it may see:

- all-gather (the `xla` reference; MaxText's and Levanter's default, AXLearn's): K, V and the segment
  ids are gathered whole over the context axis, and each device attends its own queries to them with a
  mask built from every slot's true position (`balanced_order`): causal, same document, no padding.
  Memory per device: the whole sequence's K/V (GQA keeps them small), plus the reference's
  [local queries, whole sequence] scores.
- all-to-all (the Pallas kernels and cuDNN; DeepSpeed-Ulysses, also in MaxText): one all-to-all turns
  "local positions, all heads" into "all positions, 1/C of the heads", the unmodified causal kernel runs
  on whole sequences of its heads (with the true order restored and the segment ids gathered), and a
  second all-to-all returns the output. The kernels need query and key positions equal (q_len ==
  kv_len, no offset), which this gives without changing them. Heads must split C ways; kv heads that do
  not are repeated until they do (each copy serves part of its query group).

Both are exact: the same numbers as one device (tests/test_context_parallel.py). Every mesh axis is made
manual (Mosaic's requirement, see `llama_jax.kernels.sharding`); batch rows and kv heads keep the splits
the rules give them.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llama_jax.parallel.context import balanced_order, from_balanced, to_balanced
from llama_jax.parallel.logical import active_rules, logical_to_spec


def _gathered(q, k, v, segment_ids, *, axes, shards: int, masked: Callable):
    """Per device: its queries against the whole sequence's gathered keys, masked by true positions."""
    local = q.shape[1]
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
    k_all, v_all, seg_all = gather(k), gather(v), gather(segment_ids)
    order = jnp.asarray(balanced_order(local * shards, shards))
    q_pos = jax.lax.dynamic_slice_in_dim(order, jax.lax.axis_index(axes) * local, local)
    causal = order[None, :] <= q_pos[:, None]
    same_doc = (segment_ids[:, :, None] == seg_all[:, None, :]) & (segment_ids[:, :, None] != 0)
    return masked(q, k_all, v_all, (causal[None] & same_doc)[:, None])


def _heads_split(q, k, v, segment_ids, *, axes, shards: int, kernel: Callable):
    """Per device: whole sequences of 1/C of the heads through `kernel`, via two all-to-alls."""
    heads, kv_heads = q.shape[2], k.shape[2]
    repeat = shards // math.gcd(kv_heads, shards)
    if heads % shards or (heads // kv_heads) % repeat:
        raise ValueError(f"context parallelism by all-to-all over {shards} devices needs the {heads} query "
                         f"heads per device ({kv_heads} kv heads) to split {shards} ways")
    if repeat > 1:  # each kv head repeated for its query group's parts on different devices
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)

    def whole_sequence(x):
        return from_balanced(jax.lax.all_to_all(x, axes, split_axis=2, concat_axis=1, tiled=True), shards)

    seg_all = from_balanced(jax.lax.all_gather(segment_ids, axes, axis=1, tiled=True), shards)
    out = kernel(whole_sequence(q), whole_sequence(k), whole_sequence(v), seg_all)
    return jax.lax.all_to_all(to_balanced(out, shards), axes, split_axis=1, concat_axis=2, tiled=True)


def context_parallel_attention(q, k, v, segment_ids, axes: tuple[str, ...], *, masked: Callable,
                               kernel: Callable | None):
    """Causal GQA attention of q/k/v [batch, seq, heads, dim] whose `seq` is split over the mesh `axes`
    in the balanced layout. `kernel(q, k, v, segment_ids)`: a whole-sequence attention (all-to-all
    form); None for the all-gather form, which attends through `masked(q, k, v, mask)`."""
    mesh = jax.sharding.get_abstract_mesh()
    free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    batch, length, heads = logical_to_spec(("activation_batch", "activation_length", "activation_kv_heads"),
                                           active_rules(), free)
    shards = math.prod(mesh.shape[a] for a in axes)
    axis = axes[0] if len(axes) == 1 else axes
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    local = (functools.partial(_gathered, masked=masked) if kernel is None
             else functools.partial(_heads_split, kernel=kernel))
    qkv, seg = P(batch, length, heads, None), P(batch, length)
    return jax.shard_map(functools.partial(local, axes=axis, shards=shards), in_specs=(qkv, qkv, qkv, seg),
                         out_specs=qkv, axis_names=frozenset(free), check_vma=False)(
        q, k, v, segment_ids.astype(jnp.int32))
