"""Memory streaming bandwidth, and the decoding ceiling it sets: why fp32 decoding at batch 1 is bound.

At batch 1 every new token reads every weight matrix once (config M = the `small` preset: 175 MB of
fp32 matrices per token), so no decoder on this machine can beat bandwidth / bytes per token. This
probe measures that bandwidth as a decoding step sees it: a 256 MB fp32 matrix-vector product (`v @ W`,
our layout; torch's `linear` layout for torch) and a sum over the same 256 MB, jitted jax against torch
and numpy in the same process (results checked against numpy's: 1e-5 relative). Then it prints the
ceiling for the config's matrices at jax's and torch's matrix-vector rate and, unless --no-decode, times
our jitted greedy decode at batch 1 (`llama_jax.evaluation.generate.Generator`, as bench/generate.py,
random weights) as a fraction of jax's ceiling.

    bandwidth fp32 matvec 256 MB: jax 8.7 GB/s, torch 7.4 GB/s, numpy 10.6 GB/s -> jax/torch 1.17x, jax/numpy 0.82x
    ceiling M b1 fp32 (175 MB of matrices per token): jax 50 tok/s, torch 43 tok/s
    decode M b1 fp32: llama_jax 31 tok/s = 0.63x jax's ceiling

(2026-12-01, the 2-core machine under load: a quiet one streams several times more.)

    python bench/bandwidth.py [--mb 256] [--config M] [--reps 5] [--no-decode]
    python bench/bandwidth.py --smoke     # 4 MB, config S, 8 new tokens: that it runs
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from llama_jax.evaluation.generate import Generator, SamplingConfig
from llama_jax.evaluation.loading import place_model
from llama_jax.model import api
from llama_jax.model.config import load_model_config
from llama_jax.utils.host_memory import tune_host_allocator
from timer import best_seconds, check, jax_runner, machine_line
from quiet import monitor  # noqa: E402

PRESETS = {"S": "tiny", "M": "small"}  # bench/generate.py's configs


def streams(mb: float, reps: int) -> dict[str, dict[str, float]]:
    """GB/s of each framework for a matrix-vector product and a sum over an `mb` MB fp32 matrix."""
    side = int((mb * 2**20 / 4) ** 0.5)
    w = np.abs(np.random.default_rng(0).standard_normal((side, side), np.float32))  # a sum far from 0
    v = np.random.default_rng(1).standard_normal(side, np.float32)
    jw, jv, tw_t, tv = jnp.asarray(w), jnp.asarray(v), torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(v)
    tw = torch.from_numpy(w)
    programs = {
        "matvec": {"jax": jax_runner(lambda w, v: v @ w, jw, jv), "torch": lambda: torch.nn.functional.linear(tv, tw_t),
                   "numpy": lambda: v @ w},
        "sum": {"jax": jax_runner(jnp.sum, jw), "torch": lambda: tw.sum(), "numpy": lambda: w.sum()},
    }
    rates = {}
    for name, runs in programs.items():
        reference = runs["numpy"]()
        for framework in ("jax", "torch"):
            check(f"bandwidth {name} {framework}", runs[framework](), reference, 1e-5)
        rates[name] = {framework: w.nbytes / best_seconds(run, reps) / 1e9 for framework, run in runs.items()}
    return rates


def matrix_bytes(cfg) -> float:
    """fp32 bytes of the weight matrices one decoded token reads."""
    return 4 * cfg.matmul_params


def decode_rate(cfg, new: int, reps: int) -> float:
    """Best new tokens/s of our greedy decode at batch 1 (prompt 16) on random fp32 weights."""
    model = place_model(cfg, jax.tree.map(np.asarray, api.init_params(cfg)), dtype="fp32")
    generate = Generator(model, SamplingConfig(max_new_tokens=new, stop_at_eos=False), pad_id=0)
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 16)).tolist()
    generate(prompt)
    return max(generate(prompt).tokens_per_second for _ in range(reps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=256, help="size of the streamed fp32 matrix")
    parser.add_argument("--config", default="M", help="S, M or a model preset: whose ceiling to print")
    parser.add_argument("--reps", type=int, default=5, help="timed runs each (best kept)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per timed decode")
    parser.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our decode at batch 1 against the ceiling")
    parser.add_argument("--smoke", action="store_true", help="4 MB, config S, 8 new tokens, one rep")
    args = parser.parse_args(argv)
    if args.smoke:
        args.mb, args.config, args.reps, args.new = 4, "S", 1, 8
    print(machine_line(), flush=True)
    rates = streams(args.mb, args.reps)
    for name, r in rates.items():
        print(f"bandwidth fp32 {name} {args.mb:.0f} MB: jax {r['jax']:.1f} GB/s, torch {r['torch']:.1f} GB/s, numpy "
              f"{r['numpy']:.1f} GB/s -> jax/torch {r['jax'] / r['torch']:.2f}x, jax/numpy {r['jax'] / r['numpy']:.2f}x")
    cfg = load_model_config(PRESETS.get(args.config, args.config), ["dtype=float32", "attention_impl=xla"])
    per_token = matrix_bytes(cfg)
    ceiling = {framework: rates["matvec"][framework] * 1e9 / per_token for framework in ("jax", "torch")}
    print(f"ceiling {args.config} b1 fp32 ({per_token / 1e6:.0f} MB of matrices per token): jax "
          f"{ceiling['jax']:,.0f} tok/s, torch {ceiling['torch']:,.0f} tok/s", flush=True)
    if args.decode:
        ours = decode_rate(cfg, args.new, args.reps)
        print(f"decode {args.config} b1 fp32: llama_jax {ours:,.0f} tok/s = {ours / ceiling['jax']:.2f}x jax's ceiling")
    return 0


if __name__ == "__main__":
    tune_host_allocator()
    with monitor():
        sys.exit(main())
