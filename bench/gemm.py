"""GEMM rates: XLA:CPU's products against torch's (MKL/oneDNN) on the training benchmark's M shapes.

Why: bench/RESULTS.md argues from these rates where the training step's time goes (how far the fp32
step can get at XLA's own GEMM rate; why the bf16 gradients read row-major copies instead of operands
read transposed, `llama_jax/model/matmul.py`). Each product is `a @ b` jitted (jax) and eager (torch),
both in the same dtype, on the same values; the results must agree (fp32 within 1e-4, bf16 within 1e-2
relative) before anything is printed. `ᵀ` marks an operand stored the other way round and read
transposed (XLA folds the transpose into the product; torch passes a strided view), as a weight
gradient `x.T @ dy` (a) and an input gradient `dy @ W.T` (b) do.

One line per product and dtype, GFLOP/s of each and the ratio jax / torch (2026-12-01, machine loaded):

    gemm bf16 [512,2048]ᵀx[2048,1536]: jax 40 GFLOP/s, torch 234 GFLOP/s -> 0.17x

    python bench/gemm.py [--dtypes fp32,bf16] [--reps 5]
    python bench/gemm.py --smoke          # tiny shapes, one rep: that it runs (tests/test_bench_probes.py)
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from llama_jax.utils.host_memory import tune_host_allocator
from timer import best_seconds, check, jax_runner, machine_line
from quiet import monitor  # noqa: E402

# (m, k, n, which operand is stored transposed): config M's products (tokens 2048, dim 512, FFN 1536,
# vocab 32000), the 2048² product the MFU peak uses, and the two gradient forms read transposed.
SHAPES = ((2048, 512, 1536, ""), (2048, 512, 512, ""), (2048, 512, 32000, ""), (2048, 1536, 512, ""),
          (2048, 32000, 512, ""), (512, 2048, 1536, ""), (512, 2048, 1536, "a"), (2048, 1536, 512, "b"),
          (2048, 2048, 2048, ""))
SMOKE_SHAPES = ((64, 32, 48, ""), (32, 64, 48, "a"), (64, 48, 32, "b"))
DTYPES = {"fp32": (jnp.float32, torch.float32, 1e-4), "bf16": (jnp.bfloat16, torch.bfloat16, 1e-2)}


def operands(m: int, k: int, n: int, transposed: str, dtype):
    """jax (a, b) as stored ([k, m] for a transposed a, [n, k] for a transposed b) and torch views of the
    same values in the product's orientation."""
    a_shape, b_shape = ((k, m) if transposed == "a" else (m, k)), ((n, k) if transposed == "b" else (k, n))
    a, b = (jax.random.normal(jax.random.key(i), s, dtype) for i, s in enumerate((a_shape, b_shape)))
    ta, tb = (torch.from_numpy(np.array(x, np.float32)) for x in (a, b))
    return (a, b), (ta.T if transposed == "a" else ta, tb.T if transposed == "b" else tb)


def product(transposed: str):
    """`a @ b` on operands stored as `operands` makes them."""
    contract = {"": ((1,), (0,)), "a": ((0,), (0,)), "b": ((1,), (1,))}[transposed]
    return lambda a, b: jax.lax.dot_general(a, b, (contract, ((), ())))


def label(m: int, k: int, n: int, transposed: str) -> str:
    a, b = ("ᵀ" if transposed == "a" else ""), ("ᵀ" if transposed == "b" else "")
    return f"[{m},{k}]{a}x[{k},{n}]{b}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per product and framework (best kept)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one rep")
    args = parser.parse_args(argv)
    if unknown := set(args.dtypes.split(",")) - set(DTYPES):
        parser.error(f"unknown dtypes {sorted(unknown)}; choose from {sorted(DTYPES)}")
    shapes, reps = (SMOKE_SHAPES, 1) if args.smoke else (SHAPES, args.reps)
    print(machine_line(), flush=True)
    for name in args.dtypes.split(","):
        jax_dtype, torch_dtype, tolerance = DTYPES[name]
        for m, k, n, transposed in shapes:
            (a, b), (ta, tb) = operands(m, k, n, transposed, jax_dtype)
            ta, tb = ta.to(torch_dtype), tb.to(torch_dtype)
            ours = jax_runner(product(transposed), a, b)
            check(f"gemm {name} {label(m, k, n, transposed)}", ours(), ta @ tb, tolerance)
            flops = 2.0 * m * k * n
            rate_jax = flops / best_seconds(ours, reps)
            rate_torch = flops / best_seconds(lambda: ta @ tb, reps)
            print(f"gemm {name} {label(m, k, n, transposed)}: jax {rate_jax / 1e9:,.0f} GFLOP/s, torch "
                  f"{rate_torch / 1e9:,.0f} GFLOP/s -> {rate_jax / rate_torch:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    tune_host_allocator()  # without the heap tunables large outputs fault in fresh pages on every call
    with monitor():
        sys.exit(main())
