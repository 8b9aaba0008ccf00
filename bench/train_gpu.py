"""Training MFU at full preset sizes on one GPU (issue 22): LLaMA 3.2-1B at seq 2048 and 8192, 3B at 2048.

Each run is `train.py`'s own jitted step (`bench/train.py`'s `Ours`: `jit_train_step`, AdamW, clipping) on
random tokens, timed over `--steps` steps after one compiling step and two warm-up steps; MFU is
`ModelConfig.flops_per_token` (6·N + attention, PaLM's accounting, as `train.py` logs it) against `job_peak` (the
datasheet's bf16 peak for the device). Both attention paths: our Pallas kernel (`pallas_gpu`) and `cudnn`;
the MFU goal is for the one `attention_impl: auto` runs at that case (`llama_jax.model.attention.AUTO`).

Why a grid and a budget: the best remat policy and batch at these sizes were never measured, and one
compile of a full-size model costs tens of seconds of a 15-minute device lease. So for each remat policy
the batch is the largest power of two that `llama_jax.training.plan` estimates to fit in `--mem-fraction`
of the device's memory (capped at `--max-tokens` per step), and the runs go in priority order (every
case with the first policy under both paths, then the other policies) until `--budget-s` would be
passed. Each finished run is appended to `--markdown` at once, so a timeout loses only the run in flight;
the best run per (case, path) is appended at the end.

    python bench/train_gpu.py --markdown bench/RESULTS.md [--budget-s 155] [--policies none,full]
    python bench/train_gpu.py --smoke          # CPU dry run: the tiny preset, seq 64
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import jax
import numpy as np

from llama_jax.model.attention import resolve_attention
from llama_jax.model.config import load_model_config
from llama_jax.parallel.rules import rules_for
from llama_jax.training.step import make_optimizer
from llama_jax.training.peak import job_peak
from llama_jax.training.plan import activation_bytes, state_bytes_per_device
from quiet import monitor  # noqa: E402

# bench/train.py by its path: the repository's own train.py shadows it as `train` when the root is on sys.path.
_spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)
OPT, TOTAL_STEPS, Ours = bench_train.OPT, bench_train.TOTAL_STEPS, bench_train.Ours

CASES = (("llama3.2-1b", 2048), ("llama3.2-1b", 8192), ("llama3.2-3b", 2048))
SMOKE_CASES = (("tiny", 64),)
POLICIES = ("save_matmuls", "none", "full")  # the presets' own policy first
IMPLS = ("pallas_gpu", "cudnn")
MFU_GOAL = 0.5  # issue 22, for what `auto` runs at every case
HEADER = ("| model | seq | attention | remat | batch | step s | tokens/s | MFU | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|")


def auto_runs(model: str, seq: int) -> str:
    """The implementation `attention_impl: auto` runs on a GPU for this case (bf16, random packed tokens)."""
    return resolve_attention(load_model_config(model, ["attention_impl=auto", "dtype=bfloat16"]), "gpu",
                             seq_len=seq).attention_impl


def fitting_batch(cfg, seq: int, memory: float, max_tokens: int) -> int:
    """The largest power-of-two batch whose planned state + activations fit in `memory` bytes (at least 1)."""
    rules, mesh_shape = rules_for("fsdp"), {"data": 1, "fsdp": 1, "tensor": 1}
    state = sum(state_bytes_per_device(cfg, make_optimizer(OPT, TOTAL_STEPS), rules, mesh_shape).values())
    batch = 1
    while (2 * batch * seq <= max_tokens
           and state + activation_bytes(cfg, rules, mesh_shape, 2 * batch, seq, cfg.remat) <= memory):
        batch *= 2
    return batch


def run(cfg, seq: int, batch: int, steps: int) -> dict:
    """Compile, warm up and time `steps` steps of `cfg` at (batch, seq); tokens/s and MFU."""
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32) for _ in range(steps)]
    start = time.perf_counter()
    ours = Ours(cfg)
    ours.run(batches[:1])
    compile_s = time.perf_counter() - start
    ours.run(batches[:2])
    start = time.perf_counter()
    ours.run(batches)  # returns the last loss as a float: waits for every step
    step_s = (time.perf_counter() - start) / steps
    tokens_per_s = batch * seq / step_s
    peak = job_peak(jax.devices()[0], 1, cfg.dtype)
    return {"step_s": step_s, "tokens_per_s": tokens_per_s, "compile_s": compile_s,
            "mfu": peak.mfu(cfg.flops_per_token(seq) * tokens_per_s)}


def format_row(case: tuple[str, int], impl: str, policy: str, batch: int, result: dict) -> str:
    head = f"| {case[0]} | {case[1]} | {impl} | {policy} | {batch} |"
    if "error" in result:
        return f"{head} failed: {result['error']} | | | |"
    return (f"{head} {result['step_s']:.3f} | {result['tokens_per_s']:,.0f} | {result['mfu']:.1%} | "
            f"{result['compile_s']:.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: tiny preset, seq 64, one policy")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="remat policies to try, in this order (a rerun can ask for the ones a budget skipped)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--budget-s", type=float, default=240, help="start no run that would end past this")
    parser.add_argument("--mem-fraction", type=float, default=0.6,
                        help="share of device memory the plan's estimate may use (it is within ~35%%)")
    parser.add_argument("--max-tokens", type=int, default=65536, help="most tokens per step")
    parser.add_argument("--markdown", type=Path, help="append each row, then the best per case, to this file")
    args = parser.parse_args(argv)
    policies = args.policies.split(",")
    if unknown := set(policies) - set(POLICIES):
        parser.error(f"unknown remat policies {sorted(unknown)}; choose from {POLICIES}")
    cases, policies = (SMOKE_CASES, policies[:1]) if args.smoke else (CASES, policies)
    if args.smoke:
        args.max_tokens = 4 * SMOKE_CASES[0][1]
    if not args.smoke and jax.default_backend() != "gpu":
        print("no GPU here: use --smoke for the CPU dry run")
        return 2
    stats = jax.devices()[0].memory_stats() or {}
    memory = args.mem_fraction * stats.get("bytes_limit", 16 * 2 ** 30)
    out = args.markdown.open("a") if args.markdown else None

    def emit(line: str) -> None:
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit(f"\nTraining MFU (`bench/train_gpu.py`, {jax.devices()[0].device_kind}, bf16 compute, random tokens, "
         f"{args.steps} timed steps, batch = largest power of two planned to fit {args.mem_fraction:.0%} of "
         f"{memory / args.mem_fraction / 2 ** 30:.0f} GiB, at most {args.max_tokens} tokens)\n")
    emit(HEADER)
    order = [(case, impl, policy) for policy in policies for case in cases for impl in IMPLS]
    best, started, longest = {}, time.perf_counter(), 0.0
    for case, impl, policy in order:
        elapsed = time.perf_counter() - started
        if elapsed + longest > args.budget_s:
            emit(f"| {case[0]} | {case[1]} | {impl} | {policy} | | skipped: budget ({elapsed:.0f} s used) | | | |")
            continue
        cfg = load_model_config(case[0], [f"attention_impl={impl}", f"remat={policy}", "dtype=bfloat16"])
        batch = fitting_batch(cfg, case[1], memory, args.max_tokens)
        t = time.perf_counter()
        try:
            result = run(cfg, case[1], batch, args.steps)
            if (case, impl) not in best or result["mfu"] > best[(case, impl)][0]["mfu"]:
                best[(case, impl)] = (result, policy, batch)
        except Exception as e:  # noqa: BLE001  (an OOM or unsupported path is a table entry, not a crash)
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"}
        longest = max(longest, time.perf_counter() - t)
        emit(format_row(case, impl, policy, batch, result))
    emit("\nBest per case and attention path:\n")
    for (case, impl), (result, policy, batch) in best.items():
        met = "met" if result["mfu"] >= MFU_GOAL else "NOT met"
        goal = f"; goal >= {MFU_GOAL:.0%} (auto): {met}" if impl == auto_runs(*case) else ""
        emit(f"    best {case[0]} seq {case[1]} {impl}: MFU {result['mfu']:.1%} ({result['tokens_per_s']:,.0f} "
             f"tokens/s) with remat={policy}, batch {batch}{goal}")
    return 0 if best else 1


if __name__ == "__main__":
    with monitor():
        sys.exit(main())
