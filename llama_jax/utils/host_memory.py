"""Keep XLA:CPU's per-step buffers mapped: restart the program once with glibc malloc tunables set.

Each execution of a jitted step on the CPU backend allocates its temporaries as one block (2.2 GB for
the training benchmark's M config) and frees it at the end. By default glibc serves a block that large
with a fresh `mmap` and unmaps it on `free`, so every page of it is faulted in and zeroed again on
every step: ≈ 530 k page faults and ≈ 1 s of kernel time per M step on this project's 2-core CPU
machine (`bench/host_memory.py` measures this and the figures below; bench/RESULTS.md). On a VM whose
balloon reports freed memory to the host (ours does), the host takes the pages back too, and touching
them again costs host-side faults that show up as slow kernels.

The tunables, all read once when the process starts (`GLIBC_TUNABLES`, glibc ≥ 2.35):
- `glibc.malloc.hugetlb=1`: transparent huge pages for malloc's memory (fewer faults and TLB misses;
  +13–35% tokens/s on its own). Added only where THP is not disabled (`never`).
- `glibc.malloc.mmap_max=0`, `glibc.malloc.arena_max=1`, `glibc.malloc.trim_threshold=64 GiB`: large
  blocks come from the one main heap, which is never shrunk, so a step's freed block is handed to the
  next step as it is: no faults, no zeroing (train step kernel time 0.5–0.7 → ≤ 0.01 s per M step;
  0.94–1.70× the tokens/s of huge pages alone, 1.70× on the least loaded run). The price: the
  process keeps its peak heap until it exits, which a training or evaluation process reaches on its
  first step anyway.

`tune_host_allocator()` re-executes the program (same interpreter, same arguments) with the tunables
added, before anything else has happened. The programs `train.py`, `eval.py` and the benchmarks call it
first thing; library code never does. It does so only when the program will run on JAX's CPU backend,
the one the figures above were measured on (a GPU or TPU keeps its step buffers in device memory, and
its host does not need the restart). That is decided as JAX's own backend choice
(`jax/_src/xla_bridge.py`) will decide it, without starting a backend (`runs_on_cpu`):
`JAX_PLATFORM_NAME` if set, else the first entry of `JAX_PLATFORMS` if set; otherwise JAX starts every
accelerator it can and prefers any of them to the CPU, so the program runs on the CPU unless an
accelerator's JAX plugin or runtime is installed together with that accelerator's device nodes: a
`jax_plugins` CUDA plugin and `/dev/nvidia0`, `/dev/nvidiactl` or `/dev/dxg` (JAX's own list), a ROCm
plugin and `/dev/kfd`, or libtpu (or `TPU_LIBRARY_PATH`) and `/dev/accel*` or `/dev/vfio/<n>`.

A tunable the user already set keeps the user's value; when all are set (which also stops a second
restart), off Linux, with `LLAMA_JAX_MALLOC_TUNING=0`, off the CPU backend, or when the program cannot be
started again (read from standard input, `python - < script.py`, or an interactive session: the restart
would find stdin consumed) nothing happens. Older glibc ignores the tunables, so the restart is harmless
there.
"""
from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys
from pathlib import Path
from typing import Mapping

HUGE_PAGES = "glibc.malloc.hugetlb"
HEAP_KEEPING = {"glibc.malloc.mmap_max": "0", "glibc.malloc.arena_max": "1",
                "glibc.malloc.trim_threshold": str(64 * 2**30)}
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
SWITCH = "LLAMA_JAX_MALLOC_TUNING"
# The device nodes that tell an accelerator is present (CUDA's are JAX's own `hardware_utils` list), by the
# word in the name of the JAX plugin that drives it.
PLUGIN_DEVICES = {"cuda": ("dev/nvidia0", "dev/nvidiactl", "dev/dxg"), "rocm": ("dev/kfd",)}
TPU_DEVICES = ("dev/accel*", "dev/vfio/[0-9]*")


def _thp_available() -> bool:
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def wanted_tunables() -> dict[str, str]:
    """The tunables this machine benefits from, name -> value."""
    return {**({HUGE_PAGES: "1"} if _thp_available() else {}), **HEAP_KEEPING}


def _jax_plugins() -> set[str]:
    """The names of the installed JAX plugins (the `jax_plugins` namespace package and entry points, where
    JAX itself looks), found without importing any of them."""
    from importlib.metadata import entry_points

    spec = importlib.util.find_spec("jax_plugins")
    found = {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations or [])} if spec else set()
    return found | {f"{e.name} {e.value}" for e in entry_points(group="jax_plugins")}


def _tpu_runtime(environ: Mapping[str, str]) -> bool:
    return importlib.util.find_spec("libtpu") is not None or Path(environ.get("TPU_LIBRARY_PATH", "")).is_file()


def _present(root: Path, patterns: tuple[str, ...]) -> bool:
    return any(next(root.glob(pattern), None) is not None for pattern in patterns)


def runs_on_cpu(environ: Mapping[str, str] = os.environ, root: Path = Path("/")) -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting any (see above); `root` is
    where the device nodes are looked for."""
    if name := environ.get("JAX_PLATFORM_NAME", "").strip().lower():
        return name == "cpu"
    if platforms := environ.get("JAX_PLATFORMS", "").strip().lower():
        return platforms.split(",")[0].strip() == "cpu"
    accelerators = [word for word, nodes in PLUGIN_DEVICES.items() if _present(root, nodes)]
    if accelerators and any(word in plugin for plugin in _jax_plugins() for word in accelerators):
        return False
    return not (_present(root, TPU_DEVICES) and _tpu_runtime(environ))


def tune_host_allocator() -> None:
    """Restart this program with the malloc tunables it lacks added to `GLIBC_TUNABLES` (see above)."""
    if not sys.platform.startswith("linux") or os.environ.get(SWITCH) == "0" or not runs_on_cpu():
        return
    if sys.argv[0] in ("-", ""):  # program from stdin or interactive: it cannot be run a second time
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    user_set = {item.split("=", 1)[0] for item in tunables.split(":") if item}
    missing = [f"{name}={value}" for name, value in wanted_tunables().items() if name not in user_set]
    if not missing:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(([tunables] if tunables else []) + missing))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
