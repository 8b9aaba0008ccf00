"""Every stage docs/curation.md names runs in the pinned environment, on the built-in sample: one source
per stage, each the sample through that one stage (c4_rules included: datatrove's C4 filter needs the
spacy wheel, no downloaded model)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from llama_jax.curate.config import STAGES

DOCS = Path(__file__).resolve().parent.parent / "docs" / "curation.md"


def documented_stages() -> list[str]:
    """The stage names in the first column of the docs' "What runs" table."""
    return re.findall(r"^\| `([a-z0-9_]+)` \|", DOCS.read_text(), flags=re.MULTILINE)


def test_every_documented_stage_runs_on_the_sample(tmp_path, curate_models):
    from llama_jax.curate.config import load_config
    from llama_jax.curate.funnel import FUNNEL_FILE
    from llama_jax.curate.run import execute

    stages = documented_stages()
    assert sorted(stages) == sorted(STAGES)
    sources = ", ".join(f"{{name: {stage.replace('_', '-')}, format: sample, stages: [{stage}]}}" for stage in stages)
    overrides = [f"output_dir={tmp_path}", "progress=false", "mixture.enabled=false", "executor.tasks=1",
                 "executor.workers=1", "sample_bytes=1", f"sources=[{sources}]",
                 f"models.kenlm={curate_models.kenlm}", f"models.sentencepiece={curate_models.sentencepiece}",
                 f"models.reference={curate_models.reference}"]  # the session's models: not the sample's own
    execute(load_config(None, overrides), report=lambda line: None)
    rows = {row["source"]: row for row in json.loads((tmp_path / FUNNEL_FILE).read_text()) if row["stage"] != "read"}
    read = next(row for row in json.loads((tmp_path / FUNNEL_FILE).read_text()) if row["stage"] == "read")
    for stage in stages:
        row = rows[stage.replace("_", "-")]
        assert row["stage"] == stage and row["docs_in"] == read["docs_out"] > 300, row
    # the sample's pages are prose and docstrings: C4's rules keep some and drop some
    assert 0 < rows["c4-rules"]["docs_out"] < rows["c4-rules"]["docs_in"]


def test_only_the_command_line_sends_stderr_to_the_worker_log(tmp_path, monkeypatch, capsys):
    """`execute` runs every phase with the caller's stderr; `llama-jax-curate` sends it to
    OUTPUT/logs/workers.log while the phases run and puts it back (sys.stderr and file descriptor 2)
    once done."""
    import os
    import sys

    from llama_jax.cli.curate import main
    from llama_jax.curate import run
    from llama_jax.curate.config import load_config

    def stderr_now():
        return sys.stderr, os.fstat(2).st_ino

    seen, make = [], run.make_executor
    monkeypatch.setattr(run, "make_executor", lambda *a, **k: seen.append(stderr_now()) or make(*a, **k))
    before = stderr_now()
    common = ["progress=false", "mixture.enabled=false", "executor.tasks=1", "executor.workers=1",
              "sample_bytes=1", "sources=[{name: commoncrawl, format: sample, stages: [line_dedup]}]"]
    run.execute(load_config(None, [f"output_dir={tmp_path / 'library'}", *common]), report=lambda line: None)
    assert seen and set(seen) == {before}
    assert not (tmp_path / "library" / run.WORKER_LOG).exists()
    seen.clear()
    assert main([f"output_dir={tmp_path / 'cli'}", *common]) == 0
    assert seen and before not in seen and stderr_now() == before
    assert "Launching pipeline for rank=0" in (tmp_path / "cli" / run.WORKER_LOG).read_text()  # datatrove's log
