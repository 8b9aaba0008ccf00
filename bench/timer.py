"""Timing and reporting shared by the small probes (`gemm.py`, `bandwidth.py`, `decode_products.py`).

Each probe times a jitted JAX program and its competitor (torch, numpy) in the same process, one after
the other, `reps` times each, and reports the best run: on the shared 2-core development machine a busy
moment only ever slows a run, so the fastest is the closest to what the hardware does. Ratios of two
figures from the same run are what to compare across runs (see bench/RESULTS.md).
"""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Callable

import jax
import numpy as np
import torch


def best_seconds(run: Callable[[], object], reps: int) -> float:
    """Fastest of `reps` timed calls of `run` (which must return only when its work is done), after one
    untimed call (compilation, first-touch page faults)."""
    run()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def jax_runner(fn, *args) -> Callable[[], object]:
    """A call of jitted `fn` on `args` that waits for the result."""
    compiled = jax.jit(fn)
    return lambda: jax.block_until_ready(compiled(*args))


def relative_error(ours, theirs) -> float:
    """‖ours − theirs‖ / ‖theirs‖ in fp64 (either may be a jax array, numpy array or torch tensor)."""
    a, b = (np.asarray(x.float() if isinstance(x, torch.Tensor) else x, np.float64) for x in (ours, theirs))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(name: str, ours, theirs, tolerance: float) -> None:
    """Exit 1 (no figures) when a probe's program does not compute what its competitor does."""
    err = relative_error(ours, theirs)
    if not err <= tolerance:
        print(f"{name}: results differ from the competitor's (relative error {err:.2e} > {tolerance:.0e})")
        sys.exit(1)


def machine_line() -> str:
    """The first line every probe prints: where and with what it ran."""
    return (f"machine: {platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}; jax "
            f"{jax.__version__}, numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads); GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
