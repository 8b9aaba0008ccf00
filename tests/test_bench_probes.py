"""The probes behind bench/RESULTS.md's GEMM, bandwidth, decode-product, malloc and context-parallel
figures keep running.

Each probe checks its own programs against its competitor's before printing a figure (products and
reductions against torch / numpy, context-parallel attention against one device's, exit 1 on a mismatch;
the malloc A/B's three processes must compute bitwise the same losses), so a `--smoke` run that prints
its ratio lines is also a correctness check of what it times. Timings are not asserted: they depend on the machine.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATIO = r"-?[0-9.]+x"
PROBES = {
    "gemm.py": [rf"^gemm (fp32|bf16) \[64,32\]x\[32,48\]: jax .* -> {RATIO}$",
                rf"^gemm (fp32|bf16) \[32,64\]ᵀx\[64,48\]: .* -> {RATIO}$",
                rf"^gemm (fp32|bf16) \[64,48\]x\[48,32\]ᵀ: .* -> {RATIO}$"],
    "bandwidth.py": [rf"^bandwidth fp32 matvec 4 MB: .* jax/torch {RATIO}, jax/numpy {RATIO}$",
                     rf"^bandwidth fp32 sum 4 MB: .* jax/torch {RATIO}, jax/numpy {RATIO}$",
                     r"^ceiling S b1 fp32 \(22 MB of matrices per token\): jax [0-9,]+ tok/s, torch [0-9,]+ tok/s$",
                     rf"^decode S b1 fp32: llama_jax [0-9,]+ tok/s = {RATIO} jax's ceiling$"],
    "decode_products.py": [rf"^product S attention \[256,256\] b8: jax .* -> {RATIO}$",
                           rf"^product S output \[256,8000\] two halves b8: .* -> {RATIO}$",
                           rf"^product S output \[256,8000\] stored \[out, in\] b8: .* -> {RATIO}$"],
    "sandbox.py": [rf"^ratio bwrap/(before|hook only): .* per program -> {RATIO} \(medians {RATIO}\)$"],
    "context_parallel.py": [r"^context all-gather T=256 C=4 heads 8/2: [0-9,.]+ ms fwd\+bwd, [0-9,.]+ MiB temporaries",
                            r"^context all-to-all T=256 C=4 heads 8/2: [0-9,.]+ ms fwd\+bwd, [0-9,.]+ MiB temporaries",
                            rf"^ratio all-gather / all-to-all: time {RATIO}, temporaries {RATIO}$"],
    "host_memory.py": [r"^tunables smoke bf16 stock: [0-9,]+ tokens/s, [0-9,]+ minor faults",
                       r"^ratio smoke bf16 .* / stock = [0-9.]+ \(tokens/s\); faults [0-9.]+x$"],
}


@pytest.mark.slow
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_probe_smoke_run(probe):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "LLAMA_JAX_MALLOC_TUNING": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / probe), "--smoke"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for pattern in PROBES[probe]:
        assert re.search(pattern, proc.stdout, re.MULTILINE), f"{pattern!r} not in:\n{proc.stdout}"


def _bench(script: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_a_bench_run_on_a_busy_machine_is_labelled_loaded():
    """One process spinning on each core during the whole run: the bench says its ratio is not valid."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        out = _bench("gemm.py", "--smoke")
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert re.search(r"^load before: 1-min load average [0-9.]+ on [0-9]+ CPUs; other processes busy on [0-9.]+ CPUs$",
                     out, re.MULTILINE), out
    assert re.search(r"^load after: 1-min load average [0-9.]+;", out, re.MULTILINE), out
    assert re.search(r"^load: loaded: ratio not valid \(", out, re.MULTILINE), out


def test_the_verdict_counts_only_other_processes_against_half_the_cores(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from quiet import LOADED, verdict
    assert verdict(2, load_before=0.4, others_before=0.1, others_during=0.9) == "quiet"
    assert verdict(2, load_before=1.1, others_before=0.1, others_during=0.1) == LOADED
    assert verdict(2, load_before=0.4, others_before=1.2, others_during=0.1) == LOADED
    assert verdict(2, load_before=0.4, others_before=0.1, others_during=1.01) == LOADED
    assert verdict(16, load_before=7.9, others_before=7.9, others_during=7.9) == "quiet"


# Runs a bench as its own program, with the CPU peak measurement made to report what a busy machine
# gives: far less than the train step itself reaches (1 MFLOP/s).
BUSY_PEAK = """import runpy, sys
import llama_jax.training.peak as peak
peak.measured_matmul_peak = lambda dtype, n=2048, reps=7: 1e6
sys.path.insert(0, {bench!r})
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_train_bench_mfu_is_at_most_one_when_the_peak_was_measured_on_a_busy_machine(tmp_path):
    """bench/train.py's MFU uses training's peak logic: a peak measured while the machine was busy (below
    the step's own rate) is re-measured and never left below that rate, so the printed MFU is at most 100%
    (a bench that divides by its one measurement prints far above)."""
    script = tmp_path / "busy_peak.py"
    script.write_text(BUSY_PEAK.format(bench=str(ROOT / "bench"), script=str(ROOT / "bench" / "train.py")))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, env=env,
                          timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    mfus = [float(m.replace(",", "")) for m in re.findall(r"(?:mfu_cpu_measured|MFU) ([0-9.,]+)% of", out)]
    assert mfus and all(0 < m <= 100.0 for m in mfus), out
    assert re.search(r"^load: (quiet|loaded: ratio not valid) \(", out, re.MULTILINE), out
