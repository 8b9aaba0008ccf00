"""Deduplication on planted copies, and the same config on the other executors: the sbatch scripts a
Slurm run submits (checked with a stand-in `sbatch`, never run) and a local Ray cluster."""
from __future__ import annotations

import gzip
import json
import os
import random
import stat
from pathlib import Path

import dill
import pytest
import yaml

from llama_jax.curate.config import load_config
from llama_jax.curate.run import execute

SHARDS = 2


def _near_copy(page: str, every: int, rng: random.Random) -> str:
    """`page` reflowed onto one line with one word in `every` replaced."""
    words = page.split()
    for i in range(rng.randrange(every), len(words), every):
        words[i] = f"changed{i}"
    return " ".join(words)


@pytest.fixture(scope="module")
def dup_crawl(tmp_path_factory, english_pages):
    """20 distinct pages; in the other shard: an exact copy of page 0, a near copy of page 1 (1 word in
    150 changed: 5-gram Jaccard ~0.94) and a far copy of page 2 (1 word in 4 changed: ~0.1)."""
    rng = random.Random(7)
    pages = english_pages[200:220]
    shards = [[{"id": f"p{i}", "text": p} for i, p in enumerate(pages[:10])],
              [{"id": f"p{i}", "text": p} for i, p in enumerate(pages[10:], start=10)]]
    shards[1] += [{"id": "exact", "text": pages[0]}, {"id": "near", "text": _near_copy(pages[1], 150, rng)},
                  {"id": "far", "text": _near_copy(pages[2], 4, rng)}]
    root = tmp_path_factory.mktemp("dups")
    (root / "crawl").mkdir()
    for i, records in enumerate(shards):
        with gzip.open(root / "crawl" / f"{i}.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return root / "crawl"


def dedup_overrides(crawl: Path, out: Path, kind: str = "local", workers: int = 1) -> list[str]:
    return [f"output_dir={out}", "progress=false", f"executor.kind={kind}", f"executor.workers={workers}",
            f"sources=[{{name: cc, format: jsonl, path: {crawl}, stages: [exact_dedup, minhash]}}]",
            "mixture.sources=[{name: cc, weight: 1.0}]"]


def output_ids(root: Path, tag: str) -> set[str]:
    ids = set()
    for shard in (root / "cc" / tag).glob("*.jsonl.gz"):
        with gzip.open(shard, "rt") as fh:
            ids.update(json.loads(line)["id"] for line in fh)
    return ids


def test_exact_copy_removed_by_hashing_and_near_copy_by_minhash(tmp_path, dup_crawl):
    execute(load_config(None, dedup_overrides(dup_crawl, tmp_path)), report=lambda line: None)
    originals = {f"p{i}" for i in range(20)}
    after_exact = output_ids(tmp_path, "01_exact_dedup")
    assert after_exact == originals | {"near", "far"}  # one of the two identical pages: the first one
    assert output_ids(tmp_path, "02_minhash") == originals | {"far"}


FAKE_SBATCH = """#!/usr/bin/env python3
import json, os, sys
log = os.environ["FAKE_SBATCH_LOG"]
calls = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
with open(log, "a") as fh:
    fh.write(json.dumps({"args": sys.argv[1:-1], "script": open(sys.argv[-1]).read()}) + "\\n")
print(f"Submitted batch job {1000 + len(calls)}")
"""


def test_slurm_submits_one_dependent_array_per_phase(tmp_path, dup_crawl, monkeypatch):
    """A stand-in `sbatch` records what it is given: every phase is an sbatch array of the configured
    tasks, on the configured partition, each depending on the previous phase, and each script runs the
    phase's pickled executor."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(tmp_path / "sbatch.log"))
    overrides = dedup_overrides(dup_crawl, tmp_path / "out", kind="slurm") + [
        "executor.tasks=3", "executor.slurm.partition=cpu-long", "executor.slurm.cpus_per_task=2",
        "executor.slurm.venv_path=/opt/venv/bin/activate", "executor.slurm.sbatch_args=[account=data]"]
    lines = []
    phases = execute(load_config(None, overrides), report=lines.append)
    assert lines == [f"submitted {len(phases)} Slurm array jobs; launch scripts under {tmp_path / 'out' / 'logs'}"]
    calls = [json.loads(line) for line in (tmp_path / "sbatch.log").read_text().splitlines()]
    arrays = [c for c in calls if "launch_pickled_pipeline" in c["script"]]  # (the others merge stats)
    assert len(arrays) == len(phases)
    previous_id = None
    for number, (phase, call) in enumerate(zip(phases, arrays)):
        script = (Path(phase.logging_dir) / "launch_script.slurm").read_text()
        assert script == call["script"]
        directives = dict(line[len("#SBATCH --"):].partition("=")[::2] for line in script.splitlines()
                          if line.startswith("#SBATCH --"))
        assert directives["array"] == f"0-{phase.tasks - 1}%1"  # at most `workers` (1) at once
        assert directives["partition"] == "cpu-long" and directives["cpus-per-task"] == "2"
        assert directives["account"] == "data"
        assert directives["job-name"] == f"curate-{phase.source}-{phase.stage}-{phase.step}"
        assert "source /opt/venv/bin/activate" in script
        assert f"launch_pickled_pipeline {phase.logging_dir}/executor.pik" in script
        dependency = [a for a in call["args"] if a.startswith("--dependency=")]
        assert dependency == ([] if previous_id is None else [f"--dependency=afterok:{previous_id}"])
        previous_id = 1000 + calls.index(call)
        with open(Path(phase.logging_dir) / "executor.pik", "rb") as fh:
            executor = dill.load(fh)
        assert [type(s).__name__ for s in executor.pipeline] == [type(s).__name__ for s in phase.pipeline]
        assert executor.world_size == phase.tasks
    assert [p.tasks for p in phases[:4]] == [3, 3, 1, 3]  # read; exact dedup: signatures, find, filter


def test_slurm_config_from_yaml_and_unknown_executor(tmp_path, capsys):
    from llama_jax.cli.curate import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"executor": {"kind": "slurm", "slurm": {"partition": "x", "qos": "high"}}}))
    assert load_config(str(config), []).executor.slurm.qos == "high"
    config.write_text(yaml.safe_dump({"executor": {"kind": "kubernetes"}}))
    assert main([str(config)]) == 2
    assert "executor.kind: unknown executor 'kubernetes'" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_local_cluster_removes_the_same_copies(tmp_path, dup_crawl):
    """The dedup pipeline on a local Ray cluster (2 CPUs) removes what the local executor does."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        execute(load_config(None, dedup_overrides(dup_crawl, tmp_path, kind="ray", workers=2)), report=lambda line: None)
    finally:
        ray.shutdown()
    originals = {f"p{i}" for i in range(20)}
    assert output_ids(tmp_path, "01_exact_dedup") == originals | {"near", "far"}
    assert output_ids(tmp_path, "02_minhash") == originals | {"far"}
    manifest = json.loads((tmp_path / "mixture" / "manifest.json").read_text())
    assert sum(entry["documents"] for entry in manifest["shards"]) == 21
