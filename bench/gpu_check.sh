#!/usr/bin/env bash
# The one prepared GPU check of the Pallas attention kernels (issue 8). From the repository root:
#
#     PYTHON=.venv/bin/python bash bench/gpu_check.sh        # PYTHON defaults to python3
#
# 1. Correctness on the real GPU (compiled Triton kernels, no interpret mode) against the xla reference:
#    the shape matrix of tests/test_kernels.py, forward and dq/dk/dv (its kernels pick interpret mode
#    only where no GPU is), and the tiny-model training step of tests/test_kernels_train.py.
# 2. The attention benchmark (bench/attention.py): our kernel vs xla vs cuDNN, T = 1k..16k, then the
#    block-size / warps / stages sweep of our kernel at T = 4096.
# 3. A short table, also appended to bench/RESULTS.md with the date, the GPU and the jax version.
#
# Budget: under 7 minutes on an H100/H200 in the worst case (each step has its own timeout below).
# Without an NVIDIA GPU only the CPU part runs (interpret-mode correctness) and the GPU figures stay open.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no NVIDIA GPU here: running the CPU part only; the GPU figures are still open"
    exec "$PYTHON" bench/attention.py
fi

export JAX_PLATFORMS=cuda
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
JAX_VERSION=$("$PYTHON" -c 'import jax; assert jax.default_backend() == "gpu", jax.devices(); print(jax.__version__)') \
    || { echo "jax does not see the GPU"; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== 1/3 correctness on $GPU, jax $JAX_VERSION: compiled Pallas GPU kernel vs xla reference"
# Four test processes share the GPU (compiling is the slow part), so none may preallocate its memory.
# -v: each test's verdict as it ends (kept if the timeout strikes); faulthandler: stacks of a test stuck 60 s.
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 "$PYTHON" -m pytest -v -rfE --tb=short -n 4 -p no:cacheprovider \
    -o faulthandler_timeout=60 \
    tests/test_kernels.py tests/test_kernels_train.py -k "not tpu and not poison" 2>&1 | tee "$WORK/pytest.log"
TESTS_STATUS=${PIPESTATUS[0]}
TESTS_SUMMARY=$(tail -n 1 "$WORK/pytest.log")

echo "== 2/3 benchmark"
timeout 200 "$PYTHON" bench/attention.py --sweep 4096 --markdown "$WORK/table.md" 2>&1 | tee "$WORK/bench.log"
BENCH_STATUS=${PIPESTATUS[0]}

echo "== 3/3 results"
{
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M UTC') - $GPU, jax $JAX_VERSION"
    echo
    echo "Correctness (tests/test_kernels.py GPU cases + training step, compiled kernels): $TESTS_SUMMARY"
    echo
    if [ -s "$WORK/table.md" ]; then cat "$WORK/table.md"; else echo "benchmark failed (exit $BENCH_STATUS)"; fi
} | tee -a bench/RESULTS.md

[ "$TESTS_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ]
