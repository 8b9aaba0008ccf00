"""Causal attention benchmark: our Pallas GPU kernel vs the `xla` reference vs cuDNN.

On a GPU: forward and forward+backward time (median of --iters after --warmup, each call waited for
with `jax.block_until_ready`), achieved TFLOP/s and peak memory, at T = 1k..16k, head_dim 128, bf16,
batch x heads filling the chip (batch = --tokens / T, so every row of the table does the same number of
token-heads). Then one `ratio` line per comparison and T, with its verdict against the goals (issue 22):
against cuDNN fwd+bwd >= 0.85x at every T, and at T = 4096 fwd+bwd >= 0.9x and fwd >= 0.95x; against
xla fwd+bwd >= 2x at T = 4096.

FLOPs are the causal ones: forward = half of 4*B*H*T^2*D; forward+backward = 3.5x forward (the backward's
5 products against the forward's 2, not counting the recomputation a flash backward does).
Peak memory is XLA's own account of the compiled fwd+bwd program (arguments + outputs + temporaries),
so it is per implementation, not a process-wide high-water mark. With batch * T fixed, memory that grows
linearly in T per sequence stays flat down the table; the reference's T x T scores grow with T.

First, on a GPU, `attention_impl: cudnn` (through the registry) is checked against the `xla` reference
(forward and backward, bf16, GQA, causal; `check` lines, exit 1 on a failure, the table still follows).
On a CPU (no GPU): correctness only, small shapes in interpret mode, both Pallas kernels vs `xla`, and
`cudnn` refused by the choice of an implementation (`resolve_attention`, as every program builder asks it).

    python bench/attention.py [--seq-lens 1024,2048,4096,8192,16384] [--markdown bench/RESULTS.md]
                              [--sweep 4096]

`--sweep T` then times variants of our kernel's block sizes, warps and pipeline stages at that T (the
forward and the backward separately, so each kernel's best setting can be read off), against cuDNN's
fwd+bwd at the same T: the data for choosing `flash_attention_gpu`'s defaults.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llama_jax.model.attention import (AttentionCase, attention, choose_impl, cudnn_attention,  # noqa: E402
                                       xla_attention)
from llama_jax.utils.config_io import ConfigError  # noqa: E402
from llama_jax.kernels import flash_attention_gpu, flash_attention_tpu  # noqa: E402
from quiet import monitor  # noqa: E402

IMPLS = {"pallas_gpu": flash_attention_gpu, "xla": xla_attention, "cudnn": cudnn_attention}
# Least throughput ratios of pallas_gpu over each implementation: (fwd, fwd+bwd) at T = 4096, fwd+bwd elsewhere.
GOALS = {"cudnn": ((0.95, 0.9), 0.85), "xla": ((0.0, 2.0), 0.0)}


def inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    return q, k, v, d_out


def programs(fn):
    """Jitted forward and forward+backward (vjp with a given cotangent) of one implementation."""
    forward = jax.jit(lambda q, k, v, d_out: fn(q, k, v))

    @jax.jit
    def forward_backward(q, k, v, d_out):
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(d_out)

    return forward, forward_backward


def median_seconds(program, args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(program(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(program, args) -> int:
    stats = program.lower(*args).compile().memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes \
        - stats.alias_size_in_bytes


# Kernel settings tried by --sweep, each one change from flash_attention_gpu's defaults (forward blocks
# 128 x 128, dK/dV 64 x 128, dQ 128 x 32, 8 warps at head_dim 128, 3 pipeline stages).
SWEEP = {
    "defaults": {},
    "fwd 128x64": dict(block_k=64),
    "fwd 64x128": dict(block_q=64),
    "dkdv 32x128": dict(block_q_dkdv=32),
    "dkdv 64x64": dict(block_k_dkdv=64),
    "dq 128x64": dict(block_k_dq=64),
    "dq 128x16": dict(block_k_dq=16),
    "2 stages": dict(num_stages=2),
    "4 stages": dict(num_stages=4),
}


def benchmark(args) -> list[dict]:
    rows = []
    for seq in args.seq_lens:
        batch = max(1, args.tokens // seq)
        data = inputs(batch, seq, args.heads, args.kv_heads, args.head_dim, jnp.bfloat16)
        fwd_flops = 2 * batch * args.heads * seq * seq * args.head_dim  # half of 4*B*H*T^2*D
        for name, fn in IMPLS.items():
            row = {"impl": name, "seq": seq, "batch": batch}
            try:
                forward, forward_backward = programs(fn)
                row["fwd_ms"] = 1e3 * median_seconds(forward, data, args.warmup, args.iters)
                row["fwdbwd_ms"] = 1e3 * median_seconds(forward_backward, data, args.warmup, args.iters)
                row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
                row["fwdbwd_tflops"] = 3.5 * fwd_flops / row["fwdbwd_ms"] / 1e9
                row["peak_gib"] = peak_bytes(forward_backward, data) / 2 ** 30
            except Exception as e:  # noqa: BLE001  (an OOM or unsupported case is a table entry, not a crash)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def sweep(args, seq: int, cudnn_fwdbwd_ms: float | None) -> list[str]:
    """Markdown rows: each SWEEP variant's forward, backward (fwd+bwd minus fwd) and fwd+bwd times at T,
    and its largest relative difference from the defaults' (out, dq, dk, dv), so a fast but wrong
    setting shows."""
    batch = max(1, args.tokens // seq)
    data = inputs(batch, seq, args.heads, args.kv_heads, args.head_dim, jnp.bfloat16)
    lines = [f"Sweep at T = {seq}, batch {batch} (cuDNN fwd+bwd {cudnn_fwdbwd_ms or float('nan'):.3f} ms)", "",
             "| variant | fwd ms | bwd ms | fwd+bwd ms | cuDNN / ours (fwd+bwd) | max rel. diff vs defaults |",
             "|---|---|---|---|---|---|"]
    baseline = None
    for name, kwargs in SWEEP.items():
        try:
            forward, forward_backward = programs(functools.partial(flash_attention_gpu, **kwargs))
            fwd = 1e3 * median_seconds(forward, data, args.warmup, args.iters)
            both = 1e3 * median_seconds(forward_backward, data, args.warmup, args.iters)
            results = (forward(*data),) + tuple(forward_backward(*data))
            baseline = baseline or results
            diff = max(float(jnp.linalg.norm((r - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
                       for r, b in zip(results, baseline))
            vs = f"{cudnn_fwdbwd_ms / both:.2f}x" if cudnn_fwdbwd_ms else "n/a"
            line = f"| {name} | {fwd:.3f} | {both - fwd:.3f} | {both:.3f} | {vs} | {diff:.1e} |"
        except Exception as e:  # noqa: BLE001  (a variant that does not compile or fit is a table entry)
            line = f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | |"
        print(line, flush=True)
        lines.append(line)
    return lines


def format_row(row) -> str:
    if "error" in row:
        return f"| {row['impl']} | {row['seq']} | {row['batch']} | failed: {row['error']} | | | | |"
    return (f"| {row['impl']} | {row['seq']} | {row['batch']} | {row['fwd_ms']:.3f} | {row['fwd_tflops']:.1f} | "
            f"{row['fwdbwd_ms']:.3f} | {row['fwdbwd_tflops']:.1f} | {row['peak_gib']:.2f} |")


HEADER = ("| impl | T | batch | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB (fwd+bwd) |\n"
          "|---|---|---|---|---|---|---|---|")


def ratio_lines(rows) -> list[str]:
    """Throughput of pallas_gpu over each other implementation, per T, with the verdict against GOALS."""
    by_key = {(r["impl"], r["seq"]): r for r in rows if "error" not in r}
    lines = []
    for seq in sorted({r["seq"] for r in rows}):
        ours = by_key.get(("pallas_gpu", seq))
        for other, (at_4096, elsewhere) in GOALS.items():
            theirs = by_key.get((other, seq))
            if ours is None or theirs is None:
                lines.append(f"ratio pallas_gpu/{other} T={seq}: n/a (one side failed)")
                continue
            fwd = theirs["fwd_ms"] / ours["fwd_ms"]
            both = theirs["fwdbwd_ms"] / ours["fwdbwd_ms"]
            want_fwd, want_both = at_4096 if seq == 4096 else (0.0, elsewhere)
            goal = " and ".join(f"{what} >= {x}x" for what, x in (("fwd", want_fwd), ("fwd+bwd", want_both)) if x)
            met = fwd >= want_fwd and both >= want_both
            verdict = f" goal {goal}: {'met' if met else 'NOT met'}" if goal else ""
            lines.append(f"ratio pallas_gpu/{other} T={seq}: fwd {fwd:.2f}x fwd+bwd {both:.2f}x{verdict}")
    return lines


def cpu_check() -> int:
    """No GPU: both Pallas kernels (interpret mode) against the reference on small shapes."""
    q, k, v, d_out = inputs(2, 200, 8, 2, 64, jnp.float32)
    seg = jnp.asarray(np.repeat([[1] * 120 + [2] * 60 + [0] * 20], 2, axis=0), jnp.int32)
    failures = 0
    def results(fn):
        forward, forward_backward = programs(fn)
        return (forward(q, k, v, d_out),) + forward_backward(q, k, v, d_out)

    for name, fn in (("pallas_gpu", flash_attention_gpu), ("pallas_tpu", flash_attention_tpu)):
        for segments in (None, seg):
            got = results(lambda q, k, v: fn(q, k, v, segments, block_q=64, block_k=64))
            want = results(lambda q, k, v: xla_attention(q, k, v, segments))
            err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want))
            ok = err <= 2e-5
            failures += not ok
            print(f"check {name} segments={segments is not None}: max abs error (out, dq, dk, dv) {err:.2e} "
                  f"{'ok' if ok else 'FAILED (> 2e-5)'}")
    try:
        choose_impl("cudnn", AttentionCase("cpu", "bfloat16", q.shape[-1], q.shape[1]))
        print("check cudnn choice on cpu: FAILED (chosen instead of refused)")
        failures += 1
    except ConfigError as e:
        print(f"check cudnn choice on cpu: refused, ok ({e})")
    print("no GPU here: timings, TFLOP/s and memory are open until this runs on one")
    return 1 if failures else 0


def cudnn_check() -> int:
    """On a GPU: `attention(..., impl="cudnn")` (the registry's dispatch, what `attention_impl: cudnn`
    runs) against the `xla` reference in fp32 on the same bf16 inputs, causal, GQA 32/8 heads, head_dim
    128, T 1024 and 333 (not a block multiple): out, dq, dk, dv each within ||err|| / ||ref|| <= 2e-2
    (tests/test_kernels.py's bf16 tolerance). Returns the number of failures."""
    failures = 0
    for seq in (1024, 333):
        q, k, v, d_out = inputs(2, seq, 32, 8, 128, jnp.bfloat16, seed=seq)
        _, cudnn_grads = programs(lambda q, k, v: attention(q, k, v, impl="cudnn"))
        try:
            got = (jax.jit(lambda q, k, v: attention(q, k, v, impl="cudnn"))(q, k, v),) + cudnn_grads(q, k, v, d_out)
        except Exception as e:  # noqa: BLE001  (an unsupported shape is a failed check, and the table follows)
            failures += 1
            print(f"check cudnn vs xla (fp32) T={seq}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        up = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
        _, ref_grads = programs(xla_attention)
        want = (jax.jit(xla_attention)(*up[:3]),) + ref_grads(*up)
        errors = [float(jnp.linalg.norm((g.astype(jnp.float32) - w).ravel()) / jnp.linalg.norm(w.ravel()))
                  for g, w in zip(got, want)]
        ok = all(e <= 2e-2 for e in errors) and all(g.dtype == jnp.bfloat16 for g in got)
        failures += not ok
        print(f"check cudnn vs xla (fp32) T={seq} bf16 GQA 32/8 causal: relative error (out, dq, dk, dv) "
              + ", ".join(f"{e:.1e}" for e in errors) + f" {'ok' if ok else 'FAILED (> 2e-2)'}", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", default="1024,2048,4096,8192,16384",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tokens", type=int, default=32768, help="batch = tokens // T")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--markdown", type=Path, help="append the table and ratio lines to this file")
    parser.add_argument("--sweep", type=int, metavar="T", help="then time the SWEEP variants of our kernel at T")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        return cpu_check()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, bf16, batch*T = {args.tokens}")
    failures = cudnn_check()
    print(HEADER)
    rows = benchmark(args)
    ratios = ratio_lines(rows)
    print("\n".join(ratios))
    lines = [HEADER] + [format_row(r) for r in rows] + [""] + [f"    {r}" for r in ratios]
    if args.sweep:
        cudnn = next((r["fwdbwd_ms"] for r in rows if r["impl"] == "cudnn" and r["seq"] == args.sweep
                      and "error" not in r), None)
        lines += [""] + sweep(args, args.sweep, cudnn)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    with monitor():
        sys.exit(main())
