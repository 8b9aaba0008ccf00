"""Huge pages for XLA:CPU's per-step buffers: restart the program once with glibc's THP tunable set.

Each execution of a jitted step on the CPU backend allocates its temporaries as one block (2.2 GB for
the training benchmark's M config) and frees it at the end. glibc serves a block that large with a
fresh `mmap`, so every 4 KiB page of it is faulted in and zeroed again on every step: ≈ 640 k page
faults and 1.1–1.3 s of kernel time per 3 s step on this project's 2-core CPU machine. With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc ≥ 2.35) malloc asks the kernel for transparent huge
pages on those blocks: ≈ 2 k faults per step, and the train step ran 15–20% faster in back-to-back
runs (bench/RESULTS.md), the fewer TLB misses helping as much as the fewer faults.

The tunable is read once, when the process starts, so `use_huge_pages()` re-executes the program
(same interpreter, same arguments) with it added, before anything else has happened. The programs
`train.py`, `eval.py` and the benchmarks call it first thing; library code never does. Nothing happens
where it cannot help: off Linux, with transparent huge pages disabled (`never`), when the variable
already mentions the tunable (a user's own setting wins; this is also what stops a second restart), or
when `LLAMA_JAX_HUGE_PAGES=0`. Older glibc ignores the tunable, so the restart is harmless there.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_available() -> bool:
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def use_huge_pages() -> None:
    """Restart this program with `GLIBC_TUNABLES` asking for huge pages, unless set or unhelpful."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or TUNABLE in tunables
            or os.environ.get("LLAMA_JAX_HUGE_PAGES") == "0" or not _thp_available()):
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
