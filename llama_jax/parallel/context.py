"""Context parallelism's sequence layout: which positions of a sequence each device holds.

When the rules put `activation_length` on a mesh axis of size C > 1 (the `context` axis), every
activation's sequence dimension is split C ways. Split contiguously, causal attention would be lopsided:
the device holding the first part has keys for a triangle of it alone, the last device for a C times
larger band. So the sequence is cut into 2C equal chunks and device c holds chunks c and 2C-1-c (the
"head-tail" or mirrored layout of Megatron, torchtitan and MaxText): every device gets one early and one
late chunk and the same number of unmasked query-key blocks, to within one
(`visible_blocks_per_shard`, tests/test_context_parallel.py).

The model permutes its inputs into this layout once on entry (`to_balanced`: tokens, positions, segment
ids, so RoPE uses each token's true position) and its final hidden states back on exit
(`from_balanced`); in between, only attention knows, through `balanced_order` (each layout slot's true
position, from which it builds the causal mask). Both permutations are reshapes, a reversal and a stack,
which XLA turns into collective-permutes of the halves that move.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.parallel.logical import active_rules, logical_to_spec


def context_axes() -> tuple[str, ...]:
    """The mesh axes that split sequences in the program being traced (the rules' `activation_length`
    axes of the mesh in context that are not already manual), or () when they do not split it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not active_rules():
        return ()
    free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    target = logical_to_spec(("activation_length",), active_rules(), free)[0]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return axes if math.prod(mesh.shape[a] for a in axes) > 1 else ()


def context_shards() -> int:
    """How many ways sequences are split (1: no context parallelism)."""
    axes = context_axes()
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def _check(length: int, shards: int) -> int:
    if length % (2 * shards):
        raise ValueError(f"context parallelism over {shards} devices: sequence length {length} must be a "
                         f"multiple of 2 × {shards} = {2 * shards} (two mirrored chunks per device)")
    return length // (2 * shards)


def to_balanced(x, shards: int, axis: int = 1):
    """`x` with its sequence `axis` in the balanced layout: device c's slots hold chunks c and 2C-1-c."""
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.moveaxis(x, axis, 0)
    chunk = _check(x.shape[0], shards)
    halves = x.reshape(2, shards, chunk, *x.shape[1:])
    out = xp.stack([halves[0], halves[1][::-1]], axis=1).reshape(x.shape)
    return xp.moveaxis(out, 0, axis)


def from_balanced(x, shards: int, axis: int = 1):
    """The inverse of `to_balanced`: natural order again."""
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.moveaxis(x, axis, 0)
    chunk = _check(x.shape[0], shards)
    pairs = x.reshape(shards, 2, chunk, *x.shape[1:])
    out = xp.stack([pairs[:, 0], pairs[::-1, 1]], axis=0).reshape(x.shape)
    return xp.moveaxis(out, 0, axis)


def balanced_order(length: int, shards: int) -> np.ndarray:
    """The true position of each slot of the balanced layout: [length] int32 (device c: slots
    [c·length/C, (c+1)·length/C))."""
    return to_balanced(np.arange(length, dtype=np.int32), shards, axis=0)


def visible_blocks_per_shard(order: np.ndarray, shards: int, block: int) -> list[int]:
    """For each device, how many (query block, key block) pairs causal attention must compute when the
    sequence is laid out as `order` (slot -> true position): its queries in blocks of `block` slots, the
    keys in blocks of `block` true positions; a pair counts when any query in it sees any key in it."""
    length = len(order)
    per_device = length // shards
    counts = []
    for device in range(shards):
        queries = order[device * per_device:(device + 1) * per_device].reshape(-1, block)
        counts.append(int(sum(q.max() // block + 1 for q in queries)))
    return counts
