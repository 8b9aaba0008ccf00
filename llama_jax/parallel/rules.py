"""The rules table: which mesh axes each logical axis name lives on. The one place parallelism is decided.

The mesh has the axes ("data", "fsdp", "tensor") always, "context" when it splits sequences (size > 1),
and the outer "dcn_data" / "dcn_fsdp" when it spans several slices (`MESH_AXES`, `mesh_axis_names`). There
is one table (`BASE_RULES`, dp's); a strategy is a named set of changes to it (`STRATEGY_CHANGES`):

    dp        parameters replicated; batch rows split over data × fsdp.
    fsdp      as dp, but every matrix is split along its `embed` dimension over fsdp (ZeRO-3 style:
              parameters, gradients and optimizer state all live in shards, gathered per layer).
    fsdp+tp   fsdp plus Megatron tensor parallelism over `tensor`: q/k/v/w1/w3 split by output
              (heads, mlp), wo/w2 by input, the vocabulary of the embedding and output split too.

Every preset splits sequences (`activation_length`) over `context` (context parallelism: attention then
runs over a sequence split across devices, `llama_jax.model.context_attention`), and puts only batch
rows (dcn_data) and FSDP shards (dcn_fsdp) across slices: `tensor` and `context` move activations every
layer and stay on the fast links inside a slice (`check_rules_use_mesh` refuses an activation rule that
does not). Parameters are also split over `context` (FSDP over the context devices too).
Axes absent from a mesh drop out of every spec, so one table serves every mesh.

Everything that needs a mesh axis (parameter and batch shardings, the kernels' shard_map) asks the
rules through `logical_to_spec` instead of naming axes itself. Flax's own logical-axis rules
(`flax.linen.logical_axis_rules`, `nnx` sharding metadata) are not used: they neither drop the axes a
mesh lacks (which lets one table serve every mesh) nor check a rule against the mesh's slices.
"""
from __future__ import annotations

import math

from llama_jax.parallel.logical import Rules
from llama_jax.utils.config_io import ConfigError

# Outermost first: the slow data-centre network (DCN) between slices, then the axes inside a slice.
DCN_AXES = ("dcn_data", "dcn_fsdp")
ICI_AXES = ("data", "fsdp", "context", "tensor")
MESH_AXES = DCN_AXES + ICI_AXES
ALWAYS_PRESENT = ("data", "fsdp", "tensor")  # the others are in a mesh only when larger than 1
SLICE_LOCAL = ("context", "tensor")  # never across DCN
BATCH_AXES = ("dcn_data", "dcn_fsdp", "data", "fsdp")
# Parameters split over context too (ZeRO over the context devices, as MaxText does): they hold the
# same rows' other positions, so without it each would keep a whole fsdp shard.
FSDP_AXES = ("dcn_fsdp", "fsdp", "context")


def mesh_axis_names(sizes: dict[str, int]) -> tuple[str, ...]:
    """The axes a mesh of these sizes has: data, fsdp, tensor, and any other axis larger than 1."""
    return tuple(a for a in MESH_AXES if a in ALWAYS_PRESENT or sizes.get(a, 1) > 1)


# The rules table, (logical name, mesh axes), parameter names first, then activation names: `dp`'s.
# Every preset splits batch rows and sequences the same way; a strategy is its few changes to this table.
BASE_RULES: Rules = (
    ("vocab", None), ("embed", None), ("heads", None), ("kv_heads", None), ("mlp", None),
    ("norm", None), ("layers", None),
    ("activation_batch", BATCH_AXES), ("activation_length", "context"), ("activation_embed", None),
    ("activation_heads", None), ("activation_kv_heads", None), ("activation_head_dim", None),
    ("activation_mlp", None), ("activation_vocab", None),
)
_FSDP = {"embed": FSDP_AXES}
_TENSOR = {name: "tensor" for name in ("vocab", "heads", "kv_heads", "mlp", "activation_heads",
                                       "activation_kv_heads", "activation_mlp", "activation_vocab")}
STRATEGY_CHANGES: dict[str, dict] = {"dp": {}, "fsdp": _FSDP, "fsdp+tp": {**_FSDP, **_TENSOR}}
RULE_PRESETS: dict[str, Rules] = {
    strategy: tuple((name, changes.get(name, target)) for name, target in BASE_RULES)
    for strategy, changes in STRATEGY_CHANGES.items()
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
    """A mesh axis of size > 1 that no rule uses would only duplicate work: refuse it. So is an activation
    rule that splits one dimension over a DCN axis and `tensor` or `context` (those exchange activations
    every layer, so they must stay on a slice's fast links)."""
    used = set()
    for name, target in rules:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        used.update(axes)
        if name.startswith("activation_") and set(axes) & set(DCN_AXES) and set(axes) & set(SLICE_LOCAL):
            raise ConfigError(f"rule {name} -> {axes} puts {sorted(set(axes) & set(SLICE_LOCAL))} across slices "
                              f"(over DCN); tensor and context must stay inside a slice")
    idle = [axis for axis, size in mesh_shape.items() if size > 1 and axis not in used]
    if idle:
        raise ConfigError(f"mesh axes {idle} have size > 1 ({mesh_shape}) but the sharding rules never use "
                          f"them; pick a strategy that does (e.g. mesh.strategy=fsdp+tp for 'tensor')")

