"""Throughput and keep-quality of the CommonCrawl pipeline, today's settings beside the previous ones.

Two measurements per setting, in one process so both face the same machine load:

- throughput: MB/s of each stage and of the whole pipeline on the built-in sample grown to `--mb` MB
  (≥ 50 MB for the recorded figures), with each `--workers` count. Each run is a fresh output
  directory (its sample and sample models are built first, untimed); every phase is timed from the
  moment the executor starts it to the moment the next one starts. A stage's MB/s is its input bytes
  (from the funnel) over the wall time of its phases; "per worker" divides by the number of workers.
- what it keeps of the labelled crawl (`llama_jax/curate/labelled.py`), with quality models trained
  here as the tests train them: survivors per label, pairs with exactly one copy, precision/recall.

`new` is the default config; `previous` is the pipeline before fixed cutoffs (line dedup first,
MinHash 4 x 13, corpus-percentile buckets, no page rules after line dedup), set through the same options.
`--baseline-src DIR` also times another checkout's own `bench/curate.py` (e.g. `git worktree add DIR
main`), in a subprocess between the runs here: its pipeline MB/s per worker beside ours.

    python bench/curate.py [--mb 50] [--workers 1] [--tasks 2] [--baseline-src DIR] [--out runs/bench-curate]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llama_jax.curate.config import load_config
from llama_jax.curate.funnel import FUNNEL_FILE
from llama_jax.curate.run import execute
from quiet import monitor  # noqa: E402

SETTINGS = {
    "new": [],
    "previous": ["sources=[{name: commoncrawl, format: sample, stages: [line_dedup, language, minhash, quality, "
                 "reference]}]", "minhash.num_buckets=4", "minhash.hashes_per_bucket=13",
                 "quality.corpus_percentiles=[33.3, 66.7]", "line_dedup.min_doc_words=5",
                 "line_dedup.min_kept_share=0"],
}


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("datatrove", "fasttext-numpy2-wheel", "kenlm",
                                                             "sentencepiece", "spacy")) + f", python {platform.python_version()}"


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def timed_run(overrides: list[str]) -> tuple[dict[str, float], list[str]]:
    """Seconds per stage (summed over its phases) and the source's stages, for one run."""
    cfg = load_config(None, overrides)
    marks: list[tuple[float, str]] = []

    def report(line: str) -> None:
        if line.startswith("["):  # "[ n/N] source stage step (k tasks)": a phase starts
            marks.append((time.perf_counter(), line.split("]", 1)[1].split()[1]))

    execute(cfg, report=report)
    marks.append((time.perf_counter(), "end"))
    seconds: dict[str, float] = {}
    for (start, stage), (end, _) in zip(marks, marks[1:]):
        seconds[stage] = seconds.get(stage, 0.0) + end - start
    return seconds, ["read", *cfg.sources[0].stages]


def table(seconds: dict[str, float], funnel: list[dict], workers: int, stages: list[str]) -> list[str]:
    rows = {r["stage"]: r for r in funnel if r["source"] == "commoncrawl"}
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
                 f"{rows[stages[-1]]['docs_out']} of {rows['read']['docs_in']} pages kept; "
                 f"mixture {seconds.get('mixture', 0):.1f} s, funnel {seconds.get('funnel', 0):.1f} s")
    return lines


def baseline_rate(src: Path, out: Path, mb: float, workers: int) -> float:
    """Pipeline MB/s per worker of another checkout's `bench/curate.py` (its table's "pipeline" row)."""
    result = subprocess.run([sys.executable, str(src / "bench" / "curate.py"), "--mb", str(mb), "--workers",
                             str(workers), "--out", str(out)], cwd=src, env={**os.environ, "PYTHONPATH": str(src)},
                            capture_output=True, text=True, check=True)
    row = re.search(r"^\| pipeline .*\| +([0-9.]+) \| +[0-9.]+% \|$", result.stdout, re.MULTILINE)
    return float(row.group(1))


def labelled_models(out: Path):
    from llama_jax.curate.labelled import labelled_crawl, split_pages
    from llama_jax.curate.quality_models import train_quality_models
    from llama_jax.curate.sample import docstring_pages

    references, random_pages, crawl_pages = split_pages(docstring_pages())
    randoms = [r["text"] for r in labelled_crawl(random_pages, seed=1, pairs=5)]
    return train_quality_models(references, randoms, out), labelled_crawl(crawl_pages, seed=0)


def labelled_table(out: Path, models, records: list[dict], settings: list[str]) -> str:
    from llama_jax.curate.labelled import format_metrics, keep_metrics, mixture_documents, write_crawl

    write_crawl(records, out / "crawl")
    source = [s.replace("format: sample", f"format: jsonl, path: {out / 'crawl'}") for s in settings
              if s.startswith("sources=")] or [f"sources=[{{name: commoncrawl, format: jsonl, path: {out / 'crawl'}}}]"]
    overrides = [f"output_dir={out / 'run'}", "progress=false", "executor.workers=1",
                 "mixture.sources=[{name: commoncrawl, weight: 1}]", f"models.kenlm={models.kenlm}",
                 f"models.sentencepiece={models.sentencepiece}", f"models.reference={models.reference}",
                 *[s for s in settings if not s.startswith("sources=")], *source]
    execute(load_config(None, overrides), report=lambda line: None)
    return format_metrics(keep_metrics(records, mixture_documents(out / "run" / "mixture")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="sample size in MB (default 50)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="worker counts (default 1)")
    parser.add_argument("--tasks", type=int, default=2, help="tasks per phase (default 2)")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["new", "previous"])
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per setting, alternating settings; each setting's fastest run is compared (default 2)")
    parser.add_argument("--baseline-src", type=Path, help="another checkout whose bench/curate.py to time too")
    parser.add_argument("--out", default="runs/bench-curate", help="scratch directory (emptied first)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    print(versions())
    print(f"labelled crawl ({load()}):", flush=True)
    models, records = labelled_models(out / "labelled-models")
    for name in args.settings:
        print(f"\n### {name}: labelled crawl\n\n{labelled_table(out / f'labelled-{name}', models, records, SETTINGS[name])}",
              flush=True)
    rates: dict[tuple[str, int], float] = {}
    for workers in args.workers:
        for repeat in range(args.repeats):  # alternating, so a change in the machine's load hits both settings
            for name in args.settings:
                run_dir = out / f"{name}-workers-{workers}-{repeat}"
                overrides = [f"output_dir={run_dir}", f"sample_bytes={int(args.mb * 1e6)}",
                             f"executor.workers={workers}", f"executor.tasks={args.tasks}", *SETTINGS[name]]
                before = load()
                seconds, stages = timed_run(overrides)
                funnel = json.loads((run_dir / FUNNEL_FILE).read_text())
                print(f"\n### {name}, run {repeat + 1}: {args.mb:g} MB sample, {workers} worker(s) "
                      f"({before} before, {load()} after)\n")
                print("\n".join(table(seconds, funnel, workers, stages)), flush=True)
                rate = funnel[0]["bytes_in"] / 1e6 / sum(seconds[s] for s in stages) / workers
                rates[name, workers] = max(rate, rates.get((name, workers), 0.0))
            if args.baseline_src:
                before = load()
                rate = baseline_rate(args.baseline_src, out / f"baseline-{workers}-{repeat}", args.mb, workers)
                print(f"\n### baseline {args.baseline_src}, run {repeat + 1}: {rate:.3f} MB/s per worker "
                      f"({before} before, {load()} after)", flush=True)
                rates["baseline", workers] = max(rate, rates.get(("baseline", workers), 0.0))
    for workers in args.workers:
        for other in ("previous", "baseline"):
            if ("new", workers) in rates and (other, workers) in rates:
                print(f"\n{workers} worker(s), fastest runs: new {rates['new', workers]:.3f} MB/s per worker, {other} "
                      f"{rates[other, workers]:.3f}: ratio new/{other} {rates['new', workers] / rates[other, workers]:.2f}")
    return 0


if __name__ == "__main__":
    with monitor():
        raise SystemExit(main())
