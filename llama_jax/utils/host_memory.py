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
first thing; library code never does. A tunable the user already set keeps the user's value; when all
are set (which also stops a second restart), off Linux, with `LLAMA_JAX_MALLOC_TUNING=0`, or when the
program cannot be started again (read from standard input, `python - < script.py`, or an interactive
session: the restart would find stdin consumed) nothing happens. Older glibc ignores the tunables, so
the restart is harmless there.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HUGE_PAGES = "glibc.malloc.hugetlb"
HEAP_KEEPING = {"glibc.malloc.mmap_max": "0", "glibc.malloc.arena_max": "1",
                "glibc.malloc.trim_threshold": str(64 * 2**30)}
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_available() -> bool:
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def wanted_tunables() -> dict[str, str]:
    """The tunables this machine benefits from, name -> value."""
    return {**({HUGE_PAGES: "1"} if _thp_available() else {}), **HEAP_KEEPING}


def tune_host_allocator() -> None:
    """Restart this program with the malloc tunables it lacks added to `GLIBC_TUNABLES` (see above)."""
    if not sys.platform.startswith("linux") or os.environ.get("LLAMA_JAX_MALLOC_TUNING") == "0":
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
