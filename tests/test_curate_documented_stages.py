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
