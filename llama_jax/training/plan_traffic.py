"""`plan`'s traffic estimate: the bytes each device sends per training step, over the data-centre network
(DCN, between slices) and within a slice (ICI / NVLink), collective by collective.

Counted with ring algorithms, hierarchical across the two networks (a collective over a slice-local
axis and a DCN axis runs inside each slice first, then across slices on the slice's share), so the
figures are what the links carry, not what the XLA compilers will finally schedule:

    FSDP          per micro-batch, the parameters gathered twice (forward, backward) and the gradients
                  reduce-scattered once over the rules' `embed` axes: 3 × (n - 1) × the device's shard,
                  (dcn_fsdp - 1) × shard of it over DCN.
    gradients     per step, an all-reduce of the device's gradient shard over the axes that hold the same
                  shard for other rows or positions (batch and context axes FSDP does not cover):
                  2 (n - 1)/n × shard inside the slice, 2 (n - 1)/n × shard / (its in-slice part) over DCN.
    tensor        per micro-batch and layer, the Megatron all-reduces of [tokens, dim] after attention
                  and the MLP, forward and backward: 4 × 2 (t - 1)/t × tokens · dim · c.
    context       per micro-batch and layer: the all-gather form (the `xla` reference) gathers K and V
                  forward and reduce-scatters their gradients backward, 4 × (C - 1) × tokens · kv_dim/t · c;
                  the all-to-all form (kernels) moves q, k, v and the output forward and their gradients
                  backward, 2 × (C - 1)/C × tokens · (2 · q_dim + 2 · kv_dim')/t · c (kv heads repeated to
                  split C ways counted in kv_dim').
`tokens` are one device's positions of one micro-batch; c the compute dtype's bytes. Recomputation
under remat (a second forward's tensor and context traffic) is not counted.
"""
from __future__ import annotations

import math

import numpy as np

from llama_jax.model.config import ModelConfig
from llama_jax.parallel.logical import Rules, logical_to_spec
from llama_jax.parallel.rules import DCN_AXES

COLLECTIVES = ("FSDP gathers and reduce-scatters", "gradient all-reduce", "tensor all-reduces",
               "context attention")


def rule_axes(rules: Rules, name: str, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes (of a mesh shaped `mesh_shape`) the rules split the logical dimension `name` over."""
    target = logical_to_spec((name,), rules, tuple(mesh_shape))[0]
    return (target,) if isinstance(target, str) else tuple(target or ())


def _size(mesh_shape: dict[str, int], axes, dcn: bool) -> int:
    return math.prod(mesh_shape[a] for a in axes if (a in DCN_AXES) == dcn)


def traffic_bytes(cfg: ModelConfig, rules: Rules, mesh_shape: dict[str, int], *, param_shard: int, rows: int,
                  seq_len: int, micro_batches: int, kernel: bool) -> dict[str, tuple[int, int]]:
    """{collective: (bytes over DCN, bytes within a slice)} one device sends in one step (see the module
    docstring). `param_shard`: the device's parameter (and gradient) bytes; `rows`: rows per micro-batch;
    `kernel`: attention by a kernel (all-to-all form) rather than the `xla` reference (all-gather form)."""
    c = np.dtype(cfg.compute_dtype).itemsize
    fsdp = rule_axes(rules, "embed", mesh_shape)
    f_dcn, f_ici = _size(mesh_shape, fsdp, True), _size(mesh_shape, fsdp, False)
    fsdp_traffic = (3 * micro_batches * (f_dcn - 1) * param_shard,
                    3 * micro_batches * (f_ici - 1) * f_dcn * param_shard)

    rows_and_positions = rule_axes(rules, "activation_batch", mesh_shape) + rule_axes(rules, "activation_length",
                                                                                    mesh_shape)
    replicas = [a for a in rows_and_positions if a not in fsdp]
    r_dcn, r_ici = _size(mesh_shape, replicas, True), _size(mesh_shape, replicas, False)
    grads = (int(2 * (r_dcn - 1) / r_dcn * param_shard / r_ici), int(2 * (r_ici - 1) / r_ici * param_shard))

    batch_split = math.prod(mesh_shape[a] for a in rule_axes(rules, "activation_batch", mesh_shape))
    length = rule_axes(rules, "activation_length", mesh_shape)
    shards = math.prod(mesh_shape[a] for a in length)
    tokens = -(-rows // batch_split) * seq_len // shards
    t = math.prod(mesh_shape[a] for a in rule_axes(rules, "activation_heads", mesh_shape))
    tensor = int(micro_batches * cfg.n_layers * 4 * 2 * (t - 1) / t * tokens * cfg.dim * c)

    q_dim, kv_dim = cfg.n_heads * cfg.head_dim / t, cfg.kv_heads * cfg.head_dim / t
    if kernel:  # kv heads repeated until they split over the context devices
        kv_local = cfg.kv_heads // t
        kv_dim *= shards // math.gcd(kv_local, shards) if kv_local else 1
        per_layer = 2 * (shards - 1) / shards * tokens * (2 * q_dim + 2 * kv_dim) * c
    else:
        per_layer = 4 * (shards - 1) * tokens * kv_dim * c
    context = int(micro_batches * cfg.n_layers * per_layer)
    return dict(zip(COLLECTIVES, (fsdp_traffic, grads, (0, tensor), (0, context))))
