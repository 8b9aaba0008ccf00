"""`tune_host_allocator`: the program restarts once, same arguments, with glibc's malloc tunables, and a
jitted call's large buffers then stop faulting (the premise, checked first: without the tunables every
4 KiB page of a 64 MiB output is faulted in again on every call). It restarts only for JAX's CPU backend,
decided before JAX starts as JAX then decides (the oracle: the backend JAX picks in the same child)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from llama_jax.utils.host_memory import HUGE_PAGES, runs_on_cpu, wanted_tunables

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables: Linux only")

PROBE = """
import os, resource, sys
print("start", sys.argv[1:], os.environ.get("GLIBC_TUNABLES", ""), flush=True)
from llama_jax.utils.host_memory import tune_host_allocator
tune_host_allocator()
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
ARGS = "['--flag', 'value']"


def run_probe(*, from_stdin: bool = False, **env_extra) -> tuple[list[str], float]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LLAMA_JAX_MALLOC_TUNING")}
    probe = PROBE
    program = ["-"] if from_stdin else ["-c", probe]
    out = subprocess.run([sys.executable, *program, "--flag", "value"], check=True, capture_output=True, text=True,
                         input=probe if from_stdin else None, env={**env, "JAX_PLATFORMS": "cpu", **env_extra},
                         timeout=120).stdout.splitlines()
    assert out and out[-1].startswith("faults"), f"the probe did not run to its end: {out}"
    return [line for line in out if line.startswith("start")], float(out[-1].split()[1])


def ours(exclude=()) -> str:
    return ":".join(f"{k}={v}" for k, v in wanted_tunables().items() if k not in exclude)


def test_restarts_once_with_the_tunables_and_large_buffers_stop_faulting():
    pages = 64 * 2**20 / 4096
    starts, faults = run_probe(LLAMA_JAX_MALLOC_TUNING="0")
    assert starts == [f"start {ARGS} "]
    assert faults >= 0.9 * pages  # every 4 KiB page of the output faulted in again

    starts, faults = run_probe()
    assert starts == [f"start {ARGS} ", f"start {ARGS} {ours()}"]
    assert faults <= 0.01 * pages  # measured 0: the freed block is reused as it is


def test_a_users_own_tunables_are_kept_and_the_missing_ones_added():
    starts, _ = run_probe(GLIBC_TUNABLES="glibc.malloc.tcache_count=8")
    assert starts[-1] == f"start {ARGS} glibc.malloc.tcache_count=8:{ours()}"
    starts, _ = run_probe(GLIBC_TUNABLES=f"{HUGE_PAGES}=0")  # the user's value wins; the rest are added
    assert starts[-1] == f"start {ARGS} {HUGE_PAGES}=0:{ours(exclude=(HUGE_PAGES,))}"
    starts, _ = run_probe(GLIBC_TUNABLES=ours())  # nothing missing: no restart
    assert starts == [f"start {ARGS} {ours()}"]


def test_a_program_read_from_stdin_runs_once_without_a_restart():
    """`python - < script.py`: a restart would read the consumed stdin and silently do nothing."""
    starts, _ = run_probe(from_stdin=True)  # run_probe checks that the program ran to its end
    assert starts == [f"start {ARGS} "]


BACKEND_PROBE = """
import os, sys
print("start", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
from llama_jax.utils.host_memory import tune_host_allocator
tune_host_allocator()
if sys.argv[1] == "jax":
    import jax
    print("backend", jax.default_backend())
"""
PLATFORM_VARIABLES = ("GLIBC_TUNABLES", "LLAMA_JAX_MALLOC_TUNING", "JAX_PLATFORMS", "JAX_PLATFORM_NAME")


def probe_backend(start_jax: bool, **env_extra) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in PLATFORM_VARIABLES}
    return subprocess.run([sys.executable, "-c", BACKEND_PROBE, "jax" if start_jax else "-"], check=True,
                          capture_output=True, text=True, env={**env, **env_extra}, timeout=120).stdout.splitlines()


@pytest.mark.parametrize("platforms, restarts", [
    ({"JAX_PLATFORMS": "cuda"}, False), ({"JAX_PLATFORMS": "tpu"}, False), ({"JAX_PLATFORMS": "gpu,cpu"}, False),
    ({"JAX_PLATFORM_NAME": "tpu"}, False), ({"JAX_PLATFORMS": "cpu,cuda", "JAX_PLATFORM_NAME": "cuda"}, False),
    ({"JAX_PLATFORMS": "cpu"}, True), ({"JAX_PLATFORMS": "cpu,tpu"}, True),
    ({"JAX_PLATFORMS": "cuda,cpu", "JAX_PLATFORM_NAME": "cpu"}, True)])
def test_the_restart_happens_only_for_the_cpu_backend(platforms, restarts):
    """JAX_PLATFORM_NAME names the backend when set, else JAX_PLATFORMS's first entry (JAX's own order)."""
    assert probe_backend(False, **platforms) == ["start "] + ([f"start {ours()}"] if restarts else [])


def test_with_no_platform_set_the_restart_follows_the_backend_jax_picks():
    lines = probe_backend(True)
    backend = lines[-1].removeprefix("backend ")
    assert lines == ["start "] + ([f"start {ours()}"] if backend == "cpu" else []) + [f"backend {backend}"]


def test_an_accelerator_needs_its_jax_plugin_or_runtime_and_its_device_nodes(tmp_path, monkeypatch):
    """The rule when no platform is set, on a simulated host: device nodes under `root`, plugins and libtpu
    on a sys.path of their own (this machine's site-packages left out)."""
    root, site = tmp_path / "root", tmp_path / "site"
    (root / "dev").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(site), *(p for p in sys.path if "-packages" not in p)])

    def install(module: str) -> None:
        (site / module).mkdir(parents=True)
        (site / module / "__init__.py").touch()
        importlib.invalidate_caches()

    assert runs_on_cpu({}, root)
    (root / "dev" / "nvidiactl").touch()
    assert runs_on_cpu({}, root)  # a GPU but no CUDA plugin: JAX runs on the CPU
    install("jax_plugins/xla_cuda13")
    assert not runs_on_cpu({}, root)
    assert runs_on_cpu({"JAX_PLATFORMS": "cpu"}, root)
    (root / "dev" / "nvidiactl").unlink()
    assert runs_on_cpu({}, root)  # the plugin without a GPU
    (root / "dev" / "kfd").touch()
    assert runs_on_cpu({}, root)  # an AMD GPU, a CUDA plugin
    install("jax_plugins/xla_rocm7")
    assert not runs_on_cpu({}, root)
    (root / "dev" / "kfd").unlink()

    (root / "dev" / "vfio").mkdir()
    (root / "dev" / "vfio" / "vfio").touch()  # the VFIO control node alone: no device behind it
    (root / "dev" / "vfio" / "0").touch()  # a TPU v5e/v6e chip's group
    assert runs_on_cpu({}, root)  # no TPU runtime
    libtpu = tmp_path / "libtpu.so"
    libtpu.touch()
    assert not runs_on_cpu({"TPU_LIBRARY_PATH": str(libtpu)}, root)
    install("libtpu")
    assert not runs_on_cpu({}, root)
    assert runs_on_cpu({"JAX_PLATFORM_NAME": "cpu"}, root)
    (root / "dev" / "vfio" / "0").unlink()
    assert runs_on_cpu({}, root)
    (root / "dev" / "accel0").touch()  # TPU v4/v5p
    assert not runs_on_cpu({}, root)
