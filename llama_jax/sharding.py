"""Partition the model, its optimizer state and its batches over a device mesh.

One program from a laptop CPU to a pod: the mesh always has the axes ("data", "fsdp", "tensor"); on one
device every axis has size 1 and the same jitted programs run unchanged. Where things live is decided in
exactly one place, a rules table mapping the model's logical axis names (see `llama_jax.logical`) to mesh
axes; a strategy is a named preset of that table:

    dp        parameters replicated; batch rows split over data × fsdp.
    fsdp      as dp, but every matrix is split along its `embed` dimension over fsdp (ZeRO-3 style:
              parameters, gradients and optimizer state all live in shards, gathered per layer).
    fsdp+tp   fsdp plus Megatron tensor parallelism over `tensor`: q/k/v/w1/w3 split by output
              (heads, mlp), wo/w2 by input, the vocabulary of the embedding and output split too.

The train/eval steps are `llama_jax.train_step`'s functions (never a copy) under `jax.jit` with explicit
input and output shardings; the rules are installed (`logical.set_rules`) and the mesh set while they
trace, so the model's `constrain` calls pin activations at block boundaries. Optimizer-state shardings
are derived from the parameters' (the moments mirror the parameter tree), never written by hand.

Batches: every process loads only the rows its devices hold (`process_rows`: with `make_mesh`'s layout,
block `process_index` of the global batch) and `make_global_batch` assembles the global arrays.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax import logical
from llama_jax.config import ModelConfig
from llama_jax.config_io import ConfigError
from llama_jax.logical import Rules, logical_to_spec
from llama_jax.model import abstract_model
from llama_jax.train_step import TrainState, eval_step, init_params, init_train_state, train_step

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


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1: all remaining devices, at most one axis) and the rules preset."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    strategy: str = "fsdp"

    def __post_init__(self):
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{axis}={size}; expected a positive size or -1 (all remaining devices)")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
        if self.strategy not in RULE_PRESETS:
            raise ConfigError(f"mesh.strategy={self.strategy!r}; expected one of {sorted(RULE_PRESETS)}")

    def shape(self, n_devices: int) -> dict[str, int]:
        """Axis sizes with -1 resolved for `n_devices` devices; error if they do not multiply to it."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        known = math.prod(s for s in sizes.values() if s != -1)
        for axis, size in sizes.items():
            if size == -1:
                if n_devices % known:
                    raise ConfigError(f"mesh {sizes}: {n_devices} devices do not divide by the fixed axes' "
                                      f"product {known}, so mesh.{axis}=-1 cannot be resolved")
                sizes[axis] = n_devices // known
        if math.prod(sizes.values()) != n_devices:
            raise ConfigError(f"mesh data×fsdp×tensor = {sizes} uses {math.prod(sizes.values())} devices, "
                              f"but there are {n_devices}")
        return sizes


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


def device_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """Devices arranged as `shape`; across hosts, `tensor` stays inside a host and `data` spans hosts."""
    n_hosts = len({d.process_index for d in devices})
    if n_hosts == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    data, fsdp, tensor = shape
    per_host = len(devices) // n_hosts
    if per_host % tensor:
        raise ConfigError(f"mesh.tensor={tensor} must fit inside one host ({per_host} devices per host): tensor "
                          f"parallelism needs the fast links between a host's own devices")
    dcn_data = math.gcd(data, n_hosts)
    dcn_fsdp = n_hosts // dcn_data
    if fsdp % dcn_fsdp or len(devices) % n_hosts:
        raise ConfigError(f"mesh data={data} × fsdp={fsdp} × tensor={tensor} cannot be laid out over "
                          f"{n_hosts} hosts: data × fsdp must be divisible by the host count with tensor "
                          f"inside one host")
    ici = (data // dcn_data, fsdp // dcn_fsdp, tensor)
    return mesh_utils.create_hybrid_device_mesh(ici, (dcn_data, dcn_fsdp, 1), devices, process_is_granule=True)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.shape(len(devices))
    check_rules_use_mesh(rules_for(cfg.strategy), sizes)
    grid = device_grid(tuple(sizes[a] for a in MESH_AXES), devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def param_axes(model_cfg: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a pure dict shaped like the params."""
    state = nnx.state(abstract_model(model_cfg), nnx.Param)
    names = jax.tree.map(lambda v: tuple(v.get_metadata()["axes"]), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(names)


def param_shapes(model_cfg: ModelConfig) -> dict:
    """`jax.ShapeDtypeStruct` of every parameter (nothing allocated)."""
    return jax.eval_shape(lambda: init_params(model_cfg))


def param_specs(model_cfg: ModelConfig, rules: Rules, mesh_shape: dict[str, int]) -> dict:
    """PartitionSpec of every parameter; error naming the parameter if a split is uneven."""
    axes = param_axes(model_cfg)
    shapes = param_shapes(model_cfg)
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])

    def spec_of(path, shape):
        names = flat_axes[path]
        spec = logical_to_spec(names, rules, tuple(mesh_shape))
        for dim, (size, target) in enumerate(zip(shape.shape, spec)):
            parts = axis_product(mesh_shape, target)
            if size % parts:
                raise ConfigError(
                    f"parameter {'.'.join(str(k.key) for k in path)} of shape {shape.shape}: dimension {dim} "
                    f"({names[dim]}, size {size}) is not divisible by mesh axes {target} of total size {parts}")
        return spec

    return jax.tree_util.tree_map_with_path(spec_of, shapes)


def opt_state_specs(param_spec_tree: Any, optimizer: optax.GradientTransformation, model_cfg: ModelConfig) -> Any:
    """Optimizer-state specs derived from the params' (moments mirror the params); scalars replicated."""
    abstract_state = jax.eval_shape(optimizer.init, param_shapes(model_cfg))
    return optax.tree_map_params(optimizer, lambda _, spec: spec, abstract_state, param_spec_tree,
                                 transform_non_params=lambda _: PartitionSpec(),
                                 is_leaf=lambda x: isinstance(x, PartitionSpec))


def train_state_specs(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, rules: Rules,
                      mesh_shape: dict[str, int]) -> TrainState:
    params = param_specs(model_cfg, rules, mesh_shape)
    return TrainState(step=PartitionSpec(), params=params, opt_state=opt_state_specs(params, optimizer, model_cfg))


def _named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(model_cfg: ModelConfig, mesh: Mesh, rules: Rules) -> dict:
    """NamedSharding of every parameter, as a pure dict shaped like the params."""
    return _named(mesh, param_specs(model_cfg, rules, dict(mesh.shape)))


def train_state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                          rules: Rules) -> TrainState:
    return _named(mesh, train_state_specs(model_cfg, optimizer, rules, dict(mesh.shape)))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Rows of every batch array split as the rules place `activation_batch`; other dims whole."""
    return NamedSharding(mesh, logical_to_spec(("activation_batch",), rules, mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
    """Mesh in context and rules installed, so `logical.constrain` takes effect while tracing."""
    previous = logical.active_rules()
    logical.set_rules(rules)
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        logical.set_rules(previous)


def _under(mesh: Mesh, rules: Rules, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args):
        with activate(mesh, rules):
            return fn(*args)
    return call


def create_train_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                       rules: Rules, seed: int = 0) -> TrainState:
    """Random parameters and fresh optimizer state, each created directly in its shards.

    The initialiser is one jitted program whose outputs carry the target shardings, so XLA computes
    only each device's slice (partitionable threefry): nothing is ever whole on one device or host, and
    the values equal a single-device `init_params(model_cfg, seed)`.
    """
    shardings = train_state_shardings(model_cfg, optimizer, mesh, rules)
    init = jax.jit(lambda: init_train_state(init_params(model_cfg, seed), optimizer), out_shardings=shardings)
    return _under(mesh, rules, init)()


def jit_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                   *, schedule: optax.Schedule | None = None, micro_batches: int = 1,
                   donate: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`llama_jax.train_step.train_step` jitted for `mesh`: `(state, batch) -> (state, metrics)`.

    The state keeps its shardings from step to step; with `donate` its old buffers are reused for the
    new one (do not touch the input state after the call). Metrics come back replicated.
    """
    state_sh = train_state_shardings(model_cfg, optimizer, mesh, rules)
    step = functools.partial(train_step, model_cfg=model_cfg, optimizer=optimizer, schedule=schedule,
                             micro_batches=micro_batches)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sharding(mesh, rules)),
                     out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,) if donate else ())
    return _under(mesh, rules, jitted)


def jit_eval_step(model_cfg: ModelConfig, mesh: Mesh, rules: Rules) -> Callable[[Any, dict], dict]:
    """`llama_jax.train_step.eval_step` jitted for `mesh`: `(params, batch) -> {nll_sum, tokens}`."""
    step = functools.partial(eval_step, model_cfg=model_cfg)
    jitted = jax.jit(step, in_shardings=(param_shardings(model_cfg, mesh, rules), batch_sharding(mesh, rules)),
                     out_shardings=replicated(mesh))
    return _under(mesh, rules, jitted)


def process_rows(mesh: Mesh, global_rows: int, rules: Rules | None = None) -> slice:
    """The rows of a global batch that this process must load: those its own devices hold.

    With the mesh of `make_mesh` they are the contiguous block `process_index` of `process_count`.
    """
    sharding = batch_sharding(mesh, rules_for(MeshConfig.strategy) if rules is None else rules)
    indices = sharding.addressable_devices_indices_map((global_rows,)).values()
    blocks = [index[0].indices(global_rows)[:2] for index in indices]
    start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
    if (stop - start) * jax.process_count() != global_rows:
        raise ValueError(f"this process's devices hold rows [{start}, {stop}) of {global_rows}: not a contiguous "
                         f"1/{jax.process_count()} share; lay the mesh out with make_mesh")
    return slice(start, stop)


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                      rules: Rules | None = None) -> dict[str, jax.Array]:
    """Global batch arrays from this process's rows (each process passes only its own slice).

    `rules` default to the default preset's; every preset splits rows over data × fsdp.

    The global row count is local rows × process count; it must split evenly over the batch axes.
    """
    sharding = batch_sharding(mesh, rules_for(MeshConfig.strategy) if rules is None else rules)
    row_shards = axis_product(dict(mesh.shape), sharding.spec[0])
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        rows = value.shape[0] * jax.process_count() if value.ndim else 0
        if value.ndim == 0 or rows % row_shards:
            raise ValueError(f"batch[{key!r}] of local shape {value.shape} × {jax.process_count()} processes: "
                             f"global rows {rows} must be a positive multiple of data×fsdp = {row_shards}")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
