"""The malloc tunables' A/B: the training step with glibc's stock allocator, with huge pages only, and
with huge pages + heap keeping (what `train.py` sets, `llama_jax/utils/host_memory.py`).

Why: the tunables are justified (docs/training.md, the module's docstring, bench/RESULTS.md) by page
faults and kernel time per step and the tokens/s they cost; this measures all three. Each setting runs
`train.py`'s jitted step (bench/train.py's `Ours`, its S or M config) in its own process started with
that `GLIBC_TUNABLES` (glibc reads them once, at start-up; other tunables you set are kept), and the
processes alternate in rounds as bench/train.py's do: one untimed step, then `--steps` timed steps whose
minor page faults and kernel CPU time (`getrusage`) and tokens/s are recorded; medians over `--rounds`.
The three processes compute the same losses (checked: the last round's, bitwise).

    tunables M bf16 stock: 98 tokens/s, 537,927 minor faults and 1.09 s kernel time per step
    ratio M bf16 huge pages / stock = 1.17 (tokens/s); faults 0.004x
    ratio M bf16 huge pages + heap keeping / huge pages = 1.50 (tokens/s); faults 0.000x

    python bench/host_memory.py [--config M] [--precision bf16] [--rounds 3] [--steps 2]
    python bench/host_memory.py --smoke      # the tiny preset at seq 64: that it runs
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llama_jax.utils.host_memory import HEAP_KEEPING, HUGE_PAGES, wanted_tunables
from quiet import monitor  # noqa: E402

# bench/train.py by its path: the repository's own train.py shadows it as `train` when the root is on sys.path.
_spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)

SMOKE_SHAPE = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=96, seq=64, batch=2)


def settings() -> dict[str, dict[str, str]]:
    """Name -> the tunables it sets; huge pages only where transparent huge pages are not disabled."""
    wanted = wanted_tunables()
    found = {"stock": {}}
    if HUGE_PAGES in wanted:
        found["huge pages"] = {HUGE_PAGES: "1"}
    found["huge pages + heap keeping" if HUGE_PAGES in wanted else "heap keeping"] = {**wanted, **HEAP_KEEPING}
    return found


def environment(tunables: dict[str, str]) -> dict[str, str]:
    """This environment with GLIBC_TUNABLES = the user's own tunables (ours removed) + `tunables`."""
    ours = set(wanted_tunables())
    kept = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and t.split("=", 1)[0] not in ours]
    env = dict(os.environ, GLIBC_TUNABLES=":".join(kept + [f"{k}={v}" for k, v in tunables.items()]))
    return env if env["GLIBC_TUNABLES"] else {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}


def worker(shape: dict, precision: str, steps: int) -> None:
    """One setting: compile and warm up, then answer each `round` line on stdin with one JSON line."""
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, shape["vocab_size"], (shape["batch"], shape["seq"] + 1), dtype=np.int32)
               for _ in range(steps)]
    ours = bench_train.Ours(bench_train.model_config(shape, precision, scan_layers=False))
    ours.run(batches)  # compiles; the heap grows to its steady size
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            return
        ours.run(batches[:1])
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = ours.run(batches)
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"seconds": seconds, "faults": after.ru_minflt - before.ru_minflt,
                          "kernel_s": after.ru_stime - before.ru_stime, "loss": loss}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="M", choices=sorted(bench_train.CONFIGS))
    parser.add_argument("--precision", default="bf16", choices=sorted(bench_train.DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--smoke", action="store_true", help="a tiny model at seq 64, one round of one step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = SMOKE_SHAPE if args.smoke else bench_train.CONFIGS[args.config]
    name = "smoke" if args.smoke else args.config
    if args.smoke:
        args.rounds, args.steps = 1, 1
    if args.worker:
        worker(shape, args.precision, args.steps)
        return 0
    command = [sys.executable, __file__, "--worker", "--config", args.config, "--precision", args.precision,
               "--steps", str(args.steps)] + (["--smoke"] if args.smoke else [])
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; config {name} {args.precision}, "
          f"{args.rounds} rounds x {args.steps} steps", flush=True)
    workers = {}
    for label, tunables in settings().items():  # one after the other: warm-ups do not overlap
        process = subprocess.Popen(command, env=environment(tunables), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
        json.loads(process.stdout.readline())
        workers[label] = process
    records = {label: [] for label in workers}
    for _ in range(args.rounds):
        for label, process in workers.items():
            process.stdin.write("round\n")
            process.stdin.flush()
            records[label].append(json.loads(process.stdout.readline()))
    for process in workers.values():
        process.stdin.write("stop\n")
        process.stdin.close()
        process.wait()
    losses = {label: r[-1]["loss"] for label, r in records.items()}
    if len(set(losses.values())) != 1:
        print(f"the settings computed different losses: {losses}")
        return 1
    tokens = args.steps * shape["batch"] * shape["seq"]
    summary = {label: {"tokens/s": tokens / statistics.median(r["seconds"] for r in rs),
                       "faults": statistics.median(r["faults"] for r in rs) / args.steps,
                       "kernel_s": statistics.median(r["kernel_s"] for r in rs) / args.steps}
               for label, rs in records.items()}
    for label, s in summary.items():
        print(f"tunables {name} {args.precision} {label}: {s['tokens/s']:,.0f} tokens/s, {s['faults']:,.0f} minor "
              f"faults and {s['kernel_s']:.2f} s kernel time per step")
    labels = list(summary)
    for before, after in zip(labels, labels[1:]):
        a, b = summary[after], summary[before]
        print(f"ratio {name} {args.precision} {after} / {before} = {a['tokens/s'] / b['tokens/s']:.2f} (tokens/s); "
              f"faults {a['faults'] / max(b['faults'], 1):.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.nullcontext() if "--worker" in sys.argv else monitor():  # a child reports to its parent
        sys.exit(main())
