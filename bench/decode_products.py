"""Decoding's products alone: an 8-row fp32 `x @ W` inside a jitted loop against torch's `linear`.

Why: at batch 8 a decode step is a chain of small-row products, one per weight matrix, and
bench/RESULTS.md explains the decoding ratios from their speed (at M the output layer, [512, 32000] =
65.5 MB, dominates). Ours runs `--per-loop` products per
call of one jitted `fori_loop`, each fed by the previous one (x += 1e-3·mean(y), so XLA can neither
drop nor overlap them), as the decode loop runs them; torch runs `F.linear` on its own [out, in] layout
eagerly, as transformers does. The output layer is also timed as two column halves (XLA may run the
halves on both cores at once) and stored [vocab, dim] (read transposed). Each product's result is
checked against torch's (1e-5 relative) first. Per product, best of `--reps` calls (many short calls:
on a shared machine some are free of the scheduling stalls that inflate a long one, torch's above all):

    product M output [512,32000] two halves b8: jax 14.43 ms, torch linear 32.72 ms -> 2.27x

    python bench/decode_products.py [--configs S,M] [--rows 8] [--per-loop 10] [--reps 30]
    python bench/decode_products.py --smoke     # config S's smallest shapes, few products: that it runs
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from llama_jax.model.config import load_model_config
from llama_jax.utils.host_memory import tune_host_allocator
from timer import best_seconds, check, jax_runner, machine_line
from quiet import monitor  # noqa: E402

PRESETS = {"S": "tiny", "M": "small"}  # bench/generate.py's configs
FEEDBACK = 1e-3


def layer_products(cfg) -> dict[str, tuple[int, int]]:
    """[in, out] of each distinct weight-matrix shape a decoded token goes through."""
    attention = (cfg.dim, cfg.n_heads * cfg.head_dim)
    return {"attention": attention, "ffn in": (cfg.dim, cfg.ffn_hidden_dim), "ffn out": (cfg.ffn_hidden_dim, cfg.dim),
            "output": (cfg.dim, cfg.vocab_size)}


def variants(w: np.ndarray, output: bool) -> dict[str, tuple]:
    """name -> (x, *weights -> y, weights as stored): as one product, and for the output layer also as two
    column halves and with the matrix stored [out, in]."""
    found = {"": (lambda x, w: x @ w, (w,))}
    if output:
        half = w.shape[1] // 2
        found["two halves"] = (lambda x, a, b: jnp.concatenate([x @ a, x @ b], axis=1),
                               (w[:, :half].copy(), w[:, half:].copy()))
        found["stored [out, in]"] = (lambda x, wt: jax.lax.dot_general(x, wt, (((1,), (1,)), ((), ()))),
                                     (np.ascontiguousarray(w.T),))
    return found


def jax_seconds_per_product(product, x, weights, per_loop: int, reps: int) -> float:
    """Best of `reps` calls of a jitted loop of `per_loop` chained products, per product."""
    def chain(x, *ws):
        def body(_, x):
            return x + FEEDBACK * jnp.mean(product(x, *ws))
        return jax.lax.fori_loop(0, per_loop, body, x)

    return best_seconds(jax_runner(chain, *(jnp.asarray(a) for a in (x, *weights))), reps) / per_loop


def torch_seconds_per_product(x: torch.Tensor, w_out_in: torch.Tensor, per_loop: int, reps: int) -> float:
    """Best of `reps` loops of `per_loop` eager `F.linear` calls, per call."""
    def loop():
        for _ in range(per_loop):
            torch.nn.functional.linear(x, w_out_in)
    return best_seconds(loop, reps) / per_loop


def duration(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="S,M", help="S, M or model presets")
    parser.add_argument("--rows", type=int, default=8, help="rows per product (the decode batch)")
    parser.add_argument("--per-loop", type=int, default=10, help="chained products per timed call")
    parser.add_argument("--reps", type=int, default=30, help="timed calls (best kept)")
    parser.add_argument("--smoke", action="store_true", help="config S, its attention and output shapes, 2 products")
    args = parser.parse_args(argv)
    if args.smoke:
        args.configs, args.per_loop, args.reps = "S", 2, 1
    print(machine_line(), flush=True)
    rng = np.random.default_rng(0)
    for name in args.configs.split(","):
        cfg = load_model_config(PRESETS.get(name, name), [])
        shapes = layer_products(cfg)
        if args.smoke:
            shapes = {k: shapes[k] for k in ("attention", "output")}
        for kind, (fan_in, fan_out) in shapes.items():
            x = rng.standard_normal((args.rows, fan_in), np.float32)
            w = (rng.standard_normal((fan_in, fan_out), np.float32) / fan_in**0.5).astype(np.float32)
            tx, tw = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w.T))
            theirs = torch_seconds_per_product(tx, tw, args.per_loop, args.reps)
            expected = torch.nn.functional.linear(tx, tw)
            for variant, (product, weights) in variants(w, kind == "output").items():
                label = f"product {name} {kind} [{fan_in},{fan_out}]{' ' + variant if variant else ''} b{args.rows}"
                check(label, jax.jit(product)(jnp.asarray(x), *weights), expected, 1e-5)
                ours = jax_seconds_per_product(product, x, weights, args.per_loop, args.reps)
                print(f"{label}: jax {duration(ours)}, torch linear {duration(theirs)} -> {theirs / ours:.2f}x",
                      flush=True)
    return 0


if __name__ == "__main__":
    tune_host_allocator()
    with monitor():
        sys.exit(main())
