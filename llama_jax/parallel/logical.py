"""Logical axis names: the model says what each dimension *is*; one rules table says where it lives.

Parameters carry their names as `axes` metadata on the `nnx.Param`; activations are annotated with
`constrain(x, names)` at block boundaries. Both are translated to mesh axes by the active rules
(`set_rules`), so changing a parallelism strategy never touches the model. Without a mesh in context,
`constrain` is the identity and the model runs as plain single-device code.

Parameter names:  vocab, embed, heads (n_heads·head_dim, flattened), kv_heads (n_kv_heads·head_dim),
                  mlp, norm, layers.
Activation names: activation_batch, activation_length, activation_embed, activation_heads,
                  activation_kv_heads, activation_head_dim, activation_mlp, activation_vocab.
"""
from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_active_rules: Rules = ()


def set_rules(rules: Rules) -> None:
    """Install the logical→mesh rules used by `constrain` (the sharding module calls this)."""
    global _active_rules
    _active_rules = tuple(rules)


def active_rules() -> Rules:
    return _active_rules


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
    """Translate logical names to a PartitionSpec by the first matching rule; a mesh axis is used once.

    Mesh axes absent from `mesh_axes` (when given) are dropped, so one table serves meshes of any shape.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh_axes is None or a in mesh_axes))
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names under the current mesh; identity when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not _active_rules:
        return x
    spec = logical_to_spec(names, _active_rules, mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, spec)
