"""Run an attention kernel per device shard when a device mesh is in effect.

A `pallas_call` is opaque to the SPMD partitioner: under a mesh it must see per-device arrays. Attention
is independent across batch rows and across kv-head groups, so `jax.shard_map` over batch
("data", "fsdp") and heads ("tensor") needs no communication at all; the kernel runs unchanged on each
shard. With no mesh set (or the relevant axes already manual, i.e. inside a caller's own shard_map) the
kernel is called directly.
"""
from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def shard_over_mesh(kernel):
    """Wrap `kernel(q, k, v, segment_ids)` so that it runs inside shard_map under `jax.set_mesh(...)`."""

    @functools.wraps(kernel)
    def sharded(q, k, v, segment_ids=None):
        mesh = jax.sharding.get_abstract_mesh()
        free = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
        batch_axes = tuple(a for a in BATCH_AXES if a in free)
        head_axis = HEAD_AXIS if HEAD_AXIS in free else None
        if not batch_axes and head_axis is None:
            return kernel(q, k, v, segment_ids)
        batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
        head_shards = mesh.shape[head_axis] if head_axis else 1
        if q.shape[0] % batch_shards:
            raise ValueError(f"attention: batch {q.shape[0]} is not divisible by the mesh's batch axes "
                             f"{batch_axes} (size {batch_shards})")
        if k.shape[2] % head_shards:
            raise ValueError(f"attention: n_kv_heads={k.shape[2]} is not divisible by mesh axis "
                             f"'{HEAD_AXIS}' of size {head_shards}")
        heads = P(batch_axes or None, None, head_axis, None)
        args, specs = (q, k, v), (heads, heads, heads)
        if segment_ids is not None:
            args, specs = args + (segment_ids,), specs + (P(batch_axes or None, None),)
        return jax.shard_map(lambda *a: kernel(*a), in_specs=specs, out_specs=heads,
                             axis_names=frozenset(batch_axes + ((head_axis,) if head_axis else ())),
                             check_vma=False)(*args)

    return sharded
