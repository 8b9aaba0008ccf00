"""Throughput of the curation pipeline: MB/s of each CommonCrawl stage and of the whole pipeline, with
1 and 2 workers, on the built-in sample grown to `--mb` MB (≥ 50 MB for the recorded figures).

Each run is a fresh output directory (its sample and sample models are built first, untimed); then
every phase is timed from the moment the executor starts it to the moment the next one starts. A
stage's MB/s is its input bytes (from the funnel) over the wall time of its phases; "per worker"
divides by the number of workers. The stage with the largest share of the pipeline's time dominates.

    python bench/curate.py [--mb 50] [--workers 1 2] [--tasks 2] [--out runs/bench-curate]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from llama_jax.curate.config import COMMONCRAWL_STAGES, load_config
from llama_jax.curate.funnel import FUNNEL_FILE
from llama_jax.curate.run import execute
from quiet import monitor  # noqa: E402


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("datatrove", "fasttext-numpy2-wheel", "kenlm",
                                                             "sentencepiece")) + f", python {platform.python_version()}"


def timed_run(out: Path, mb: float, workers: int, tasks: int) -> tuple[dict[str, float], list[dict]]:
    """Seconds per stage (summed over its phases) and the funnel rows, for one run."""
    cfg = load_config(None, [f"output_dir={out}", f"sample_bytes={int(mb * 1e6)}", f"executor.workers={workers}",
                             f"executor.tasks={tasks}"])
    marks: list[tuple[float, str]] = []

    def report(line: str) -> None:
        if line.startswith("["):  # "[ n/N] source stage step (k tasks)": a phase starts
            marks.append((time.perf_counter(), line.split("]", 1)[1].split()[1]))
        else:
            print(line, flush=True)

    execute(cfg, report=report)
    marks.append((time.perf_counter(), "end"))
    seconds: dict[str, float] = {}
    for (start, stage), (end, _) in zip(marks, marks[1:]):
        seconds[stage] = seconds.get(stage, 0.0) + end - start
    return seconds, json.loads((out / FUNNEL_FILE).read_text())


def table(seconds: dict[str, float], funnel: list[dict], workers: int) -> list[str]:
    rows = {r["stage"]: r for r in funnel if r["source"] == "commoncrawl"}
    stages = ["read", *COMMONCRAWL_STAGES]
    total = sum(seconds[s] for s in stages)
    lines = [f"| {'stage':<11} | {'MB in':>7} | {'seconds':>8} | {'MB/s':>6} | {'MB/s/worker':>11} | {'share':>6} |",
             "|" + "|".join("-" * (w + 2) for w in (11, 7, 8, 6, 11, 6)) + "|"]
    for stage in stages:
        mb_in = rows[stage]["bytes_in"] / 1e6
        rate = mb_in / seconds[stage]
        lines.append(f"| {stage:<11} | {mb_in:>7.1f} | {seconds[stage]:>8.1f} | {rate:>6.2f} | "
                     f"{rate / workers:>11.2f} | {seconds[stage] / total:>6.1%} |")
    mb = rows["read"]["bytes_in"] / 1e6
    lines.append(f"| {'pipeline':<11} | {mb:>7.1f} | {total:>8.1f} | {mb / total:>6.2f} | "
                 f"{mb / total / workers:>11.2f} | {1:>6.0%} |")
    dominant = max(stages, key=lambda s: seconds[s])
    lines.append(f"\n{workers} worker(s): {dominant} dominates ({seconds[dominant] / total:.0%} of the pipeline's time); "
                 f"mixture {seconds.get('mixture', 0):.1f} s, funnel {seconds.get('funnel', 0):.1f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="sample size in MB (default 50)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--tasks", type=int, default=2, help="tasks per phase (default 2)")
    parser.add_argument("--out", default="runs/bench-curate", help="scratch directory (emptied first)")
    args = parser.parse_args(argv)
    print(versions())
    for workers in args.workers:
        out = Path(args.out) / f"workers-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        seconds, funnel = timed_run(out, args.mb, workers, args.tasks)
        print("\n".join(table(seconds, funnel, workers)), flush=True)
    return 0


if __name__ == "__main__":
    with monitor():
        raise SystemExit(main())
