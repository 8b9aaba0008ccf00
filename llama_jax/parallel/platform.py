"""Which platform a program is for, and abstract meshes to lower for hardware that is absent.

A program's platform is that of the devices of the mesh it is built for (`platform_of`: a real mesh,
or an abstract one from `abstract_mesh`), else the host's backend; never simply `jax.default_backend()`.
Whoever builds a program decides with it once: which attention implementation runs
(`model.attention.resolve_attention`, called by the train/eval step builders and `EvalModel`). Two
choices made per operation while tracing ask `target_platform()`, the platform of the mesh in context:
whether a Pallas kernel is compiled or interpreted (a kernel's own default, for callers that name none)
and whether the XLA:CPU fast paths are traced (`model.cpu_fast_paths`, wrapped around single products).
So a program lowered on a CPU machine for a TPU (`jax.export.export(..., platforms=["tpu"])` inside
`jax.sharding.use_abstract_mesh(abstract_mesh(...))`) holds the TPU kernel, compiled by Mosaic, exactly
as if it had been traced on the TPU itself.

What an abstract mesh cannot express: which process owns which device. Lowering sees one program over
the whole mesh, so a multi-host layout (`parallel.mesh.device_grid` across hosts, each process feeding
its own rows) is never exercised by it.
"""
from __future__ import annotations

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, Mesh

from llama_jax.parallel.rules import mesh_axis_names

# `jax.Device.device_kind` as the hardware reports it -> (platform, cores per JAX device).
# TPU v4 and v5p run two TensorCores as one device (megacore); NVIDIA cores are streaming multiprocessors.
DEVICE_KINDS: dict[str, tuple[str, int]] = {
    "TPU v4": ("tpu", 2),
    "TPU v5 lite": ("tpu", 1),  # v5e
    "TPU v5": ("tpu", 2),  # v5p
    "TPU v6 lite": ("tpu", 1),  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": ("cuda", 132),
    "AMD Instinct MI300X": ("rocm", 304),  # compute units
}

# An AMD GPU's device kind holds one of these (the test jax's own export code makes to tell ROCm from CUDA).
AMD_DEVICE_KIND_MARKS = ("amd", "instinct", "radeon")


def platform_of(mesh: Mesh | AbstractMesh | None) -> str:
    """"cpu", "gpu" (NVIDIA), "rocm" (AMD) or "tpu": the platform of `mesh`'s devices (abstract ones
    included), else (no mesh, or an empty one) of the host's backend. jax names both GPU vendors "gpu";
    the device kind tells AMD's apart, which cuDNN and our Triton kernel are not built for."""
    if isinstance(mesh, Mesh):
        device = mesh.devices.flat[0]
        platform, kind = device.platform, device.device_kind
    elif mesh is not None and not mesh.empty and mesh.abstract_device is not None:
        platform, kind = mesh.abstract_device.platform, mesh.abstract_device.device_kind
    else:
        platform = jax.default_backend()
        kind = jax.devices()[0].device_kind if platform in ("gpu", "cuda", "rocm") else ""
    if platform not in ("gpu", "cuda", "rocm"):
        return platform
    amd = platform == "rocm" or any(mark in kind.lower() for mark in AMD_DEVICE_KIND_MARKS)
    return "rocm" if amd else "gpu"


def target_platform() -> str:
    """The platform of the mesh in context while tracing (`platform_of`), else of the host's backend."""
    return platform_of(jax.sharding.get_abstract_mesh())


def abstract_mesh(shape: dict[str, int], device_kind: str) -> AbstractMesh:
    """A mesh of `shape` (axes as `rules.mesh_axis_names`: data, fsdp, tensor and any larger than 1)
    made of `device_kind` devices that need not exist
    (axis types Auto, as `parallel.mesh.make_mesh` builds them)."""
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device kind {device_kind!r}; expected one of {sorted(DEVICE_KINDS)}")
    platform, cores = DEVICE_KINDS[device_kind]
    device = AbstractDevice(device_kind=device_kind, num_cores=cores, platform=platform)
    names = mesh_axis_names(shape)
    return AbstractMesh(tuple(shape.get(axis, 1) for axis in names), names,
                        axis_types=(AxisType.Auto,) * len(names), abstract_device=device)
