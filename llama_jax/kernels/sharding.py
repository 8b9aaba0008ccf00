"""Run an attention kernel per device shard when a device mesh is in effect.

A `pallas_call` is opaque to the SPMD partitioner: under a mesh it must see per-device arrays. Attention
is independent across batch rows and across kv-head groups, so `jax.shard_map` splitting rows over the
mesh axes the rules give `activation_batch` and kv heads over those of `activation_kv_heads` needs no
communication at all; the kernel runs unchanged on each shard. Every free mesh axis is made manual,
the ones the rules leave out too (the arrays are whole along them): Mosaic refuses a kernel inside a
shard_map that leaves any mesh axis to the partitioner, even one of size 1 (tests/test_lowering.py
caught this for `fsdp` rules on a data × fsdp × tensor=1 TPU mesh). The rules are the active ones
(`llama_jax.parallel.logical.use_rules`), or the `fsdp+tp` preset when none are active. With no
mesh set (or every axis already manual, i.e. inside a caller's own shard_map) the kernel is called
directly.
"""
from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec as P

from llama_jax.parallel.logical import active_rules, logical_to_spec
from llama_jax.parallel.rules import RULE_PRESETS

FALLBACK_RULES = RULE_PRESETS["fsdp+tp"]


def _axes(target) -> tuple[str, ...]:
    return (target,) if isinstance(target, str) else tuple(target or ())


def shard_over_mesh(kernel):
    """Wrap `kernel(q, k, v, segment_ids)` so that it runs inside shard_map under `jax.set_mesh(...)`."""

    @functools.wraps(kernel)
    def sharded(q, k, v, segment_ids=None):
        mesh = jax.sharding.get_abstract_mesh()
        free = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
        batch_target, head_target = logical_to_spec(("activation_batch", "activation_kv_heads"),
                                                    active_rules() or FALLBACK_RULES, free)
        batch_axes, head_axes = _axes(batch_target), _axes(head_target)
        if not free:
            return kernel(q, k, v, segment_ids)
        batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
        head_shards = math.prod(mesh.shape[a] for a in head_axes)
        if q.shape[0] % batch_shards:
            raise ValueError(f"attention: batch {q.shape[0]} is not divisible by the mesh's batch axes "
                             f"{batch_axes} (size {batch_shards})")
        if k.shape[2] % head_shards:
            raise ValueError(f"attention: n_kv_heads={k.shape[2]} is not divisible by mesh axis "
                             f"'{','.join(head_axes)}' of size {head_shards}")
        heads = P(batch_axes or None, None, head_target, None)
        args, specs = (q, k, v), (heads, heads, heads)
        if segment_ids is not None:
            args, specs = args + (segment_ids,), specs + (P(batch_axes or None, None),)
        return jax.shard_map(lambda *a: kernel(*a), in_specs=specs, out_specs=heads,
                             axis_names=frozenset(free),
                             check_vma=False)(*args)

    return sharded
