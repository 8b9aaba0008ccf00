"""Logical axis names: the model says what each dimension *is*; one rules table says where it lives.

Parameters carry their names as `axes` metadata on the `nnx.Param`; activations are annotated with
`constrain(x, names)` at block boundaries. Both are translated to mesh axes by the active rules, so
changing a parallelism strategy never touches the model. The rules are active only inside
`use_rules(rules)` (a context variable, entered with the mesh by `parallel.mesh.activate` while a
program traces), so nothing of one program's rules outlives it or reaches another thread or program.
Without a mesh in context, `constrain` is the identity and the model runs as plain single-device code.

Parameter names:  vocab, embed, heads (n_heads·head_dim, flattened), kv_heads (n_kv_heads·head_dim),
                  mlp, norm, layers.
Activation names: activation_batch, activation_length, activation_embed, activation_heads,
                  activation_kv_heads, activation_head_dim, activation_mlp, activation_vocab.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
from jax.sharding import PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_ACTIVE_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("llama_jax_rules", default=())


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """The logical→mesh `rules` active for `constrain` (and the kernels' shard_map) inside the block."""
    token = _ACTIVE_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> Rules:
    """The rules of the innermost `use_rules` block, () outside any."""
    return _ACTIVE_RULES.get()


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
    mesh, rules = jax.sharding.get_abstract_mesh(), active_rules()
    if mesh.empty or not rules:
        return x
    spec = logical_to_spec(names, rules, mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, spec)
