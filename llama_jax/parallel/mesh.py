"""The device mesh and what is placed on it: mesh construction, shardings from logical names, batches.

One program from a laptop CPU to a pod: the mesh always has the axes ("data", "fsdp", "tensor"), plus
"context" and the cross-slice "dcn_data" / "dcn_fsdp" when they are larger than 1 (`rules.MESH_AXES`); on
one device every axis has size 1 and the same jitted programs run unchanged. Where an array lives comes from
its logical axis names and the rules table (`llama_jax.parallel.rules`); `specs_for` turns a tree of names
and shapes into PartitionSpecs, checking every split is even. `activate` installs the rules and the mesh
while a program traces, so the model's `constrain` calls pin activations at block boundaries.

Batches: every process loads only the rows its devices hold (`process_rows`: with `make_mesh`'s layout,
block `process_index` of the global batch) and `make_global_batch` assembles the global arrays.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax.parallel import logical
from llama_jax.parallel.logical import Rules, logical_to_spec
from llama_jax.parallel.rules import (DCN_AXES, DEFAULT_STRATEGY, ICI_AXES, MESH_AXES, RULE_PRESETS, axis_product,
                                      check_rules_use_mesh, mesh_axis_names, rules_for)
from llama_jax.utils.config_io import ConfigError


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1: all remaining devices, at most one axis) and the rules preset.

    data, fsdp, context, tensor are axes inside a slice (one TPU slice or one NVLink/ICI domain);
    dcn_data and dcn_fsdp split across slices, over the data-centre network: the mesh's axis `dcn_data`
    (or `dcn_fsdp`) has that many slices, each holding one whole data × fsdp × context × tensor grid.
    """

    data: int = field(default=1, metadata={"help": "mesh 'data' axis size"})
    fsdp: int = field(default=-1, metadata={"help": "mesh 'fsdp' axis size (-1: the remaining devices)"})
    context: int = field(default=1, metadata={"help": "mesh 'context' axis size (sequence split across devices)"})
    tensor: int = field(default=1, metadata={"help": "mesh 'tensor' axis size"})
    dcn_data: int = field(default=1, metadata={"help": "slices along 'dcn_data' (over the data-centre network)"})
    dcn_fsdp: int = field(default=1, metadata={"help": "slices along 'dcn_fsdp' (over the data-centre network)"})
    strategy: str = field(default=DEFAULT_STRATEGY, metadata={"choices": tuple(RULE_PRESETS),
                                                               "help": "sharding rules"})

    def __post_init__(self):
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            if size == 0 or size < -1 or (size == -1 and axis in DCN_AXES):
                raise ConfigError(f"mesh.{axis}={size}; expected a positive size"
                                  f"{'' if axis in DCN_AXES else ' or -1 (all remaining devices)'}")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
        if self.strategy not in RULE_PRESETS:
            raise ConfigError(f"mesh.strategy={self.strategy!r}; expected one of {sorted(RULE_PRESETS)}")

    def shape(self, n_devices: int) -> dict[str, int]:
        """Sizes of the mesh's axes (`rules.mesh_axis_names`) with -1 resolved for `n_devices` devices;
        error if they do not multiply to it."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        known = math.prod(s for s in sizes.values() if s != -1)
        for axis, size in sizes.items():
            if size == -1:
                if n_devices % known:
                    raise ConfigError(f"mesh {sizes}: {n_devices} devices do not divide by the fixed axes' "
                                      f"product {known}, so mesh.{axis}=-1 cannot be resolved")
                sizes[axis] = n_devices // known
        if math.prod(sizes.values()) != n_devices:
            named_sizes = " × ".join(f"{a}={n}" for a, n in sizes.items() if a in mesh_axis_names(sizes))
            raise ConfigError(f"mesh {named_sizes} uses {math.prod(sizes.values())} devices, "
                              f"but there are {n_devices}")
        return {axis: sizes[axis] for axis in mesh_axis_names(sizes)}


def _slice_grid(sizes: dict[str, int], devices: list) -> np.ndarray:
    """Devices of several slices (`slice_index`): the DCN axes outermost, one whole ICI grid per slice."""
    names = tuple(sizes)
    n_slices = math.prod(sizes[a] for a in DCN_AXES if a in sizes)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) != n_slices:
        raise ConfigError(f"mesh dcn_data × dcn_fsdp = {n_slices} slices, but the devices belong to "
                          f"{len(slices)} slice(s) (their slice_index)")
    ici = tuple(1 if a in DCN_AXES else sizes[a] for a in names)
    dcn = tuple(sizes[a] if a in DCN_AXES else 1 for a in names)
    try:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    except ValueError as err:
        raise ConfigError(f"mesh {sizes}: cannot lay out {len(devices)} devices over {n_slices} slices "
                          f"({err})") from err


def device_grid(sizes: dict[str, int], devices: list) -> np.ndarray:
    """Devices arranged as the mesh `sizes` ({axis: size}, in mesh order). Across slices, the DCN axes
    split between slices and everything else stays inside one; across hosts of one slice, `context` and
    `tensor` stay inside a host and `data` spans hosts."""
    shape = tuple(sizes.values())
    if any(sizes.get(a, 1) > 1 for a in DCN_AXES):
        return _slice_grid(sizes, devices)
    n_hosts = len({d.process_index for d in devices})
    if n_hosts == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    data, fsdp, context, tensor = (sizes.get(a, 1) for a in ICI_AXES)
    per_host = len(devices) // n_hosts
    if per_host % (context * tensor):
        raise ConfigError(f"mesh.tensor={tensor} must fit inside one host ({per_host} devices per host): tensor "
                          f"parallelism needs the fast links between a host's own devices"
                          + (f" (with mesh.context={context})" if context > 1 else ""))
    dcn_data = math.gcd(data, n_hosts)
    dcn_fsdp = n_hosts // dcn_data
    if fsdp % dcn_fsdp or len(devices) % n_hosts:
        raise ConfigError(f"mesh data={data} × fsdp={fsdp} × tensor={tensor} cannot be laid out over "
                          f"{n_hosts} hosts: data × fsdp must be divisible by the host count with tensor "
                          f"inside one host")
    ici = {"data": data // dcn_data, "fsdp": fsdp // dcn_fsdp, "context": context, "tensor": tensor}
    host_dcn = {"data": dcn_data, "fsdp": dcn_fsdp}
    return mesh_utils.create_hybrid_device_mesh(tuple(ici[a] for a in sizes), tuple(host_dcn.get(a, 1) for a in sizes),
                                                devices, process_is_granule=True)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The mesh over `devices` (default: all devices of all processes), its axes as `MeshConfig.shape`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.shape(len(devices))
    check_rules_use_mesh(rules_for(cfg.strategy), sizes)
    grid = device_grid(sizes, devices)
    return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def specs_for(axes: Any, shapes: Any, rules: Rules, mesh_shape: dict[str, int]) -> Any:
    """PartitionSpec of every array of `shapes` from its logical names in `axes` (same tree, tuples as
    leaves); an error names the array and dimension when a split is uneven."""
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


def named(mesh: Mesh, specs: Any) -> Any:
    """A tree of PartitionSpecs as NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Rows of every batch array split as the rules place `activation_batch`, and with context
    parallelism positions as they place `activation_length`; other dims whole."""
    spec = list(logical_to_spec(("activation_batch", "activation_length"), rules, mesh.axis_names))
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh | AbstractMesh, rules: Rules):
    """Mesh in context and rules installed, so `logical.constrain` takes effect while tracing.

    An `AbstractMesh` (devices that need not exist, `parallel.platform.abstract_mesh`) is for lowering
    only: programs traced under it can be exported for its platform, not run here.
    """
    with logical.use_rules(rules), (jax.sharding.use_abstract_mesh(mesh) if isinstance(mesh, AbstractMesh)
                                    else jax.set_mesh(mesh)):
        yield


def under(mesh: Mesh, rules: Rules, fn: Callable) -> Callable:
    """`fn` called with the mesh and rules active (for jitted functions: while they trace)."""
    @functools.wraps(fn)
    def call(*args):
        with activate(mesh, rules):
            return fn(*args)
    return call


def process_rows(mesh: Mesh, global_rows: int, rules: Rules | None = None) -> slice:
    """The rows of a global batch that this process must load: those its own devices hold.

    With the mesh of `make_mesh` they are the contiguous block `process_index` of `process_count`.
    """
    rows = batch_sharding(mesh, rules_for(DEFAULT_STRATEGY) if rules is None else rules).spec[:1]
    indices = NamedSharding(mesh, PartitionSpec(*rows)).addressable_devices_indices_map((global_rows,)).values()
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
    sharding = batch_sharding(mesh, rules_for(DEFAULT_STRATEGY) if rules is None else rules)
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
