"""Peak memory and throughput of checkpoint conversion on a generated ~1 GB (bf16) model.

Target (issue 6): peak RSS <= 1.3x the checkpoint's size in the target dtype. Each conversion runs in
its own child process, which reports its own peak RSS (VmHWM) and, separately, its RSS after
importing the libraries the conversion needs (torch, jax, orbax) but before reading any tensor: that
baseline is paid by any Python program using them, whatever the checkpoint's size, so the table shows
both peak / size and (peak - baseline) / size. Throughput is checkpoint bytes / conversion seconds.

The chain hf -> meta (MP=2) -> hf -> orbax -> hf must reproduce the generated safetensors file byte for
byte, which the benchmark checks. Everything is written under --workdir and deleted at the end.

    python bench/convert.py [--size-gb 1.0] [--workdir /tmp/llama_jax_convert_bench]
"""
from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from quiet import monitor

ROOT = Path(__file__).resolve().parent.parent

# (from, to, --model-parallel) in chain order; each step reads the previous step's output
STEPS = [("hf", "meta", 2), ("meta", "hf", 1), ("hf", "orbax", 1), ("orbax", "hf", 1)]


def bench_config(size_gb: float):
    """A LLaMA of about `size_gb` GB in bf16: 32000 vocab, dim 2048, as many layers as fit."""
    from llama_jax.model.config import ModelConfig
    from llama_jax.model.api import param_count

    base = ModelConfig(vocab_size=32000, dim=2048, n_heads=16, n_layers=1, dtype="bfloat16", param_dtype="bfloat16")
    per_layer = param_count(base.replace(n_layers=2)) - param_count(base)
    fixed = param_count(base) - per_layer
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    return base.replace(n_layers=layers)


def generate_hf(directory: Path, cfg) -> int:
    """Random bf16 weights written as HF safetensors by the library's streaming writer; returns bytes."""
    import ml_dtypes
    import numpy as np

    from llama_jax.convert.common import tensor_items
    from llama_jax.convert.hf import HFWriter
    from llama_jax.model.params import our_shape

    directory.mkdir(parents=True)
    writer = HFWriter(directory, cfg, np.dtype(ml_dtypes.bfloat16))
    rng = np.random.default_rng(0)
    total = 0
    for tmap, layer in tensor_items(cfg):
        shape = our_shape(tmap, cfg)[1:] if layer is not None else our_shape(tmap, cfg)
        value = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        total += value.nbytes
        writer.add(tmap, layer, value)
    writer.finish()
    return total


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM: unlike ru_maxrss, not inherited through fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(args) -> None:
    """Run one conversion in this process and print its timings and memory as JSON."""
    if "meta" in (args.src_format, args.to):
        import torch  # noqa: F401
    if "orbax" in (args.src_format, args.to):
        import orbax.checkpoint  # noqa: F401
    from llama_jax.convert import convert

    baseline = peak_rss()
    start = time.perf_counter()
    convert(args.src, args.dst, to=args.to, src_format=args.src_format, model_parallel=args.model_parallel,
            progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "seconds": seconds}))


def run_step(src: Path, dst: Path, fmt: str, to: str, model_parallel: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--from", fmt, "--to", to, "--model-parallel", str(model_parallel),
           str(src), str(dst)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--workdir", default="/tmp/llama_jax_convert_bench")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--from", dest="src_format", help=argparse.SUPPRESS)
    parser.add_argument("--to", help=argparse.SUPPRESS)
    parser.add_argument("--model-parallel", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("src", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("dst", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    work = Path(args.workdir)
    if work.exists():
        raise SystemExit(f"{work} exists; remove it or pass another --workdir")
    cfg = bench_config(args.size_gb)
    try:
        start = time.perf_counter()
        size = generate_hf(work / "0-hf", cfg)
        print(f"generated {size / 1e9:.3f} GB bf16 checkpoint (dim={cfg.dim}, n_layers={cfg.n_layers}, "
              f"vocab={cfg.vocab_size}) in {time.perf_counter() - start:.1f} s")
        print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
        print(f"{'conversion':<16}{'seconds':>9}{'GB/s':>7}{'peak RSS GB':>13}{'baseline GB':>13}"
              f"{'peak/size':>11}{'(peak-base)/size':>18}")
        src = work / "0-hf"
        for i, (fmt, to, mp) in enumerate(STEPS, 1):
            dst = work / f"{i}-{to}"
            r = run_step(src, dst, fmt, to, mp)
            name = f"{fmt} -> {to}" + (f" MP={mp}" if mp > 1 else "")
            print(f"{name:<16}{r['seconds']:>9.2f}{size / 1e9 / r['seconds']:>7.2f}{r['peak_rss'] / 1e9:>13.2f}"
                  f"{r['baseline_rss'] / 1e9:>13.2f}{r['peak_rss'] / size:>11.2f}"
                  f"{(r['peak_rss'] - r['baseline_rss']) / size:>18.2f}", flush=True)
            if src.name != "0-hf":
                shutil.rmtree(src)
            src = dst
            if to == "hf":
                same = filecmp.cmp(work / "0-hf" / "model.safetensors", dst / "model.safetensors", shallow=False)
                if not same:
                    raise SystemExit(f"{dst}: differs from the generated checkpoint")
        print("round trip hf -> meta -> hf -> orbax -> hf: byte-identical safetensors")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.nullcontext() if "--child" in sys.argv else monitor():  # a child reports to its parent
        sys.exit(main())
