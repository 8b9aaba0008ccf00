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
