#!/usr/bin/env bash
# The one prepared GPU check (issues 8 and 22). From the repository root, on the device machine:
#
#     PYTHON=python3 bash bench/gpu_check.sh [STAGE ...]    # PYTHON defaults to python3
#     bash bench/gpu_check.sh --smoke [STAGE ...]           # CPU dry run of every stage (no GPU needed)
#
# Stages (all four by default, in this order; name some to rerun only those):
#   tests      correctness of the compiled Triton kernels against the xla reference: the shape matrix of
#              tests/test_kernels.py (forward and dq/dk/dv; fp32 <= 2e-5, bf16 <= 2e-2 relative) and the
#              tiny-model training step of tests/test_kernels_train.py
#   attention  bench/attention.py: first `attention_impl: cudnn` against the xla reference (fwd+bwd, bf16,
#              GQA 32/8, causal, T 1024 and 333; `check` lines), then ours vs cuDNN vs xla, T = 1k..16k,
#              32/8 heads, head_dim 128, bf16, fwd and fwd+bwd, with the ratio to cuDNN and xla per T
#   train      bench/train_gpu.py: training MFU, LLaMA 3.2-1B (full vocab) at seq 2048 and 8192, 3B at
#              2048, attention pallas_gpu vs cudnn, remat policies and batches as its budget allows
#   decode     bench/generate.py: greedy decoding of LLaMA 3.2-1B (random weights), batch 1 and 32,
#              prompt 128, 256 new tokens, llama_jax bf16 vs transformers' generate bf16 on the same GPU
#
# Everything is appended as one dated section to bench/RESULTS.md (GPU, driver, jax/jaxlib/torch
# versions first), each stage's part as soon as it ends, so a stage that hangs (each has its own
# timeout) or an outer kill loses only what was in flight. Worst case 135 + 125 + 205 + 105 s < 10 min
# (+ 10 s for each stage that ignores SIGTERM and must be killed).
# Compiled programs are cached in .cache/jax (ignored; kept while the device machine stays warm), so a
# rerun of a stage skips most compiling (its "compile s" column then shows the cache's load time).
# Without a GPU it refuses (exit 2) unless --smoke is given; --smoke writes its section to a temporary
# file and prints it, leaving bench/RESULTS.md alone.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the device image's python3 has llama_jax only from here
SMOKE=0
STAGES=()
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        tests|attention|train|decode) STAGES+=("$arg") ;;
        *) echo "unknown argument $arg: expected --smoke and stage names (tests attention train decode)"; exit 2 ;;
    esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests attention train decode)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$SMOKE" -eq 1 ]; then
    export JAX_PLATFORMS=cpu
    RESULTS="$WORK/RESULTS.md"
    GPU="CPU smoke run" DRIVER="none"
else
    if ! nvidia-smi -L >/dev/null 2>&1; then
        echo "no NVIDIA GPU here: bench/gpu_check.sh needs one (--smoke runs the CPU dry modes)"
        exit 2
    fi
    export JAX_PLATFORMS=cuda JAX_COMPILATION_CACHE_DIR="$PWD/.cache/jax"
    RESULTS=bench/RESULTS.md
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
    DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
fi
VERSIONS=$("$PYTHON" -c 'import jax, jaxlib, torch, transformers
print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, backend {jax.default_backend()}")') \
    || { echo "$PYTHON cannot import jax, jaxlib, torch and transformers"; exit 1; }
if [ "$SMOKE" -eq 0 ] && [[ "$VERSIONS" != *"backend gpu" ]]; then
    echo "jax does not see the GPU: $VERSIONS"
    exit 1
fi

printf '\n### %s - %s (driver %s), %s: bench/gpu_check.sh %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$GPU" \
    "$DRIVER" "$VERSIONS" "${STAGES[*]}" | tee -a "$RESULTS"
FAILED=()

# stage NAME SECONDS COMMAND...: run COMMAND under its own timeout, its output in $WORK/NAME.log.
stage() {
    local name=$1 seconds=$2
    shift 2
    echo "== $name (timeout ${seconds} s)"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$WORK/$name.log"  # kills the whole process group
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        FAILED+=("$name")
        local why=""
        [ "$status" -eq 124 ] && why=" (timed out after $seconds s)"
        printf '\n%s: exit %s%s\n' "$name" "$status" "$why" | tee -a "$RESULTS"
    fi
}

for name in "${STAGES[@]}"; do
    case "$name" in
    tests)
        if [ "$SMOKE" -eq 1 ]; then
            echo "== tests: the compiled-kernel matrix needs a GPU (attention's CPU check covers interpret mode)"
            continue
        fi
        # Four test processes share the GPU (compiling is the slow part), so none may preallocate its memory.
        # -v: each test's verdict as it ends (kept if the timeout strikes); faulthandler: stacks of a test stuck 60 s.
        XLA_PYTHON_CLIENT_PREALLOCATE=false stage tests 135 "$PYTHON" -m pytest -v -rfE --tb=short -n 4 \
            -p no:cacheprovider -o faulthandler_timeout=60 \
            tests/test_kernels.py tests/test_kernels_train.py -k "not tpu and not poison"
        printf '\nCorrectness (compiled kernels vs xla: tests/test_kernels.py GPU cases + training step): %s\n' \
            "$(tail -n 1 "$WORK/tests.log")" >>"$RESULTS"
        grep -E "FAILED|ERROR" "$WORK/tests.log" | sed 's/^/    /' >>"$RESULTS"
        ;;
    attention)
        # On a CPU bench/attention.py runs its interpret-mode correctness check instead of the table.
        # Its rows are taken from the log (table lines as they are, the rest indented), so a timeout keeps them.
        stage attention 125 "$PYTHON" bench/attention.py
        {
            echo; grep '^device:' "$WORK/attention.log" | sed 's/^/    /'
            echo; grep '^|' "$WORK/attention.log"
            echo; grep -E '^(ratio|check|no GPU)' "$WORK/attention.log" | sed 's/^/    /'
        } >>"$RESULTS"
        ;;
    train)
        SMOKE_ARGS=(); [ "$SMOKE" -eq 1 ] && SMOKE_ARGS=(--smoke --steps 2)
        # Most of the GPU's memory for the training state and activations (the default is 75%).
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 stage train 205 "$PYTHON" bench/train_gpu.py --budget-s 155 \
            --markdown "$RESULTS" "${SMOKE_ARGS[@]}"
        ;;
    decode)
        DECODE_ARGS=(--configs llama3.2-1b --batches 1,32 --prompt 128 --new 256 --repeats 2)
        [ "$SMOKE" -eq 1 ] && DECODE_ARGS=(--configs S --batches 1,2 --prompt 8 --new 8 --repeats 2)
        # torch shares the GPU with jax here: jax must not take 75% of its memory up front.
        XLA_PYTHON_CLIENT_PREALLOCATE=false stage decode 105 "$PYTHON" bench/generate.py "${DECODE_ARGS[@]}" \
            --dtype bf16 --hf-dtype bf16
        printf '\nGreedy decoding (bench/generate.py %s --dtype bf16 --hf-dtype bf16):\n\n' \
            "${DECODE_ARGS[*]}" >>"$RESULTS"
        grep -E "^(machine|ratio)" "$WORK/decode.log" | sed 's/^/    /' >>"$RESULTS"
        ;;
    esac
done

echo "== done; failed stages: ${FAILED[*]:-none}"
[ "$SMOKE" -eq 1 ] && { echo "== the section a GPU run would append to bench/RESULTS.md:"; cat "$RESULTS"; }
[ ${#FAILED[@]} -eq 0 ]
