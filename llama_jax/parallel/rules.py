"""The rules tables: which mesh axes each logical axis name lives on. The one place parallelism is decided.

The mesh always has the axes ("data", "fsdp", "tensor"); a strategy is a named preset of the table:

    dp        parameters replicated; batch rows split over data × fsdp.
    fsdp      as dp, but every matrix is split along its `embed` dimension over fsdp (ZeRO-3 style:
              parameters, gradients and optimizer state all live in shards, gathered per layer).
    fsdp+tp   fsdp plus Megatron tensor parallelism over `tensor`: q/k/v/w1/w3 split by output
              (heads, mlp), wo/w2 by input, the vocabulary of the embedding and output split too.

Everything that needs a mesh axis (parameter and batch shardings, the kernels' shard_map) asks these
tables through `logical_to_spec` instead of naming axes itself.
"""
from __future__ import annotations

import math

from llama_jax.parallel.logical import Rules
from llama_jax.utils.config_io import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The rules tables: (logical name, mesh axes). Parameter names first, then activation names.
RULE_PRESETS: dict[str, Rules] = {
    "dp": (
        ("vocab", None), ("embed", None), ("heads", None), ("kv_heads", None), ("mlp", None),
        ("norm", None), ("layers", None),
        ("activation_batch", BATCH_AXES), ("activation_length", None), ("activation_embed", None),
        ("activation_heads", None), ("activation_kv_heads", None), ("activation_head_dim", None),
        ("activation_mlp", None), ("activation_vocab", None),
    ),
    "fsdp": (
        ("vocab", None), ("embed", "fsdp"), ("heads", None), ("kv_heads", None), ("mlp", None),
        ("norm", None), ("layers", None),
        ("activation_batch", BATCH_AXES), ("activation_length", None), ("activation_embed", None),
        ("activation_heads", None), ("activation_kv_heads", None), ("activation_head_dim", None),
        ("activation_mlp", None), ("activation_vocab", None),
    ),
    "fsdp+tp": (
        ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
        ("norm", None), ("layers", None),
        ("activation_batch", BATCH_AXES), ("activation_length", None), ("activation_embed", None),
        ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"), ("activation_head_dim", None),
        ("activation_mlp", "tensor"), ("activation_vocab", "tensor"),
    ),
}


DEFAULT_STRATEGY = "fsdp"


def axis_product(mesh_shape: dict[str, int], target: str | tuple[str, ...] | None) -> int:
    """How many ways one PartitionSpec entry splits its dimension on a mesh of `mesh_shape`."""
    return math.prod(mesh_shape[a] for a in ((target,) if isinstance(target, str) else target or ()))


def rules_for(strategy: str) -> Rules:
    if strategy not in RULE_PRESETS:
        raise ConfigError(f"unknown sharding strategy {strategy!r}; expected one of {sorted(RULE_PRESETS)}")
    return RULE_PRESETS[strategy]


def check_rules_use_mesh(rules: Rules, mesh_shape: dict[str, int]) -> None:
    """A mesh axis of size > 1 that no rule uses would only duplicate work: refuse it."""
    used = set()
    for _, target in rules:
        used.update((target,) if isinstance(target, str) else tuple(target or ()))
    idle = [axis for axis, size in mesh_shape.items() if size > 1 and axis not in used]
    if idle:
        raise ConfigError(f"mesh axes {idle} have size > 1 ({mesh_shape}) but the sharding rules never use "
                          f"them; pick a strategy that does (e.g. mesh.strategy=fsdp+tp for 'tensor')")

