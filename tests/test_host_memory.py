"""`use_huge_pages`: the program restarts once, same arguments, with glibc's huge-page tunable, and a
jitted call's large buffers then fault in 2 MiB pages instead of 4 KiB ones (the premise, checked
first: without it every 4 KiB page of a 64 MiB output is faulted in again on every call)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.host_memory import TUNABLE, _thp_available

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and _thp_available()),
                                reason="needs Linux with transparent huge pages enabled (madvise or always)")

PROBE = """
import os, resource, sys
sys.path.insert(0, {root!r})
print("start", sys.argv[1:], os.environ.get("GLIBC_TUNABLES", ""), flush=True)
from llama_jax.host_memory import use_huge_pages
use_huge_pages()
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 1024), jnp.float32)  # 64 MiB: above glibc's largest mmap threshold
double = jax.jit(lambda x: x * 2)
for _ in range(3):
    double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    double(x).block_until_ready()
print("faults", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def run_probe(**env_extra) -> tuple[list[str], float]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LLAMA_JAX_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), "--flag", "value"], check=True,
                         capture_output=True, text=True, env={**env, "JAX_PLATFORMS": "cpu", **env_extra},
                         timeout=120).stdout.splitlines()
    return [line for line in out if line.startswith("start")], float(out[-1].split()[1])


def test_restarts_once_with_the_tunable_and_large_buffers_stop_faulting_per_page():
    pages = 64 * 2**20 / 4096
    starts, faults = run_probe(LLAMA_JAX_HUGE_PAGES="0")
    assert starts == ["start ['--flag', 'value'] "]
    assert faults >= 0.9 * pages  # every 4 KiB page of the output faulted in again

    starts, faults = run_probe()
    assert starts == ["start ['--flag', 'value'] ", f"start ['--flag', 'value'] {TUNABLE}=1"]
    assert faults <= 0.1 * pages  # measured ≈ 550 (3%): the 2 MiB pages, plus 4 KiB ones at the ends


def test_a_users_own_tunables_are_kept_and_extended():
    starts, _ = run_probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert starts[-1] == f"start ['--flag', 'value'] glibc.malloc.arena_max=4:{TUNABLE}=1"
    starts, _ = run_probe(GLIBC_TUNABLES=f"{TUNABLE}=0")  # the user's explicit choice: no restart
    assert starts == [f"start ['--flag', 'value'] {TUNABLE}=0"]
