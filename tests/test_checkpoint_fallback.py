"""A checkpoint damaged after it was saved: the run resumes from the previous complete step, with the losses
of an uninterrupted run from there. Oracle: one uninterrupted run of the same config."""
from __future__ import annotations

import json
import shutil

import pytest

from llama_jax.checkpoint.run import meta_path
from llama_jax.training.initial_state import CheckpointsDamaged
from test_train import compilation_cache, corpus, losses_from_jsonl, run_in_process  # noqa: F401  (fixtures)


def largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGE = {
    "truncated params file": lambda step: (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]))(
        largest_file(step / "params")),
    "zeroed params file": lambda step: (lambda f: f.write_bytes(bytes(f.stat().st_size)))(largest_file(step / "params")),
    "deleted _METADATA": lambda step: (step / "params" / "_METADATA").unlink(),
    "corrupt meta JSON": lambda step: meta_path(step).write_text('{"step": 4, "data": '),
}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):  # noqa: F811
    """An uninterrupted run to step 6 and a run stopped at step 4 (checkpoints at 2 and 4) to damage."""
    root = tmp_path_factory.mktemp("fallback")
    full = run_in_process(corpus, root / "full", steps=6, checkpoint_every=2)
    run_in_process(corpus, root / "stopped", steps=6, checkpoint_every=2, stop_at_step=4)
    return root, dict(zip(range(1, 7), full.losses))


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_latest_step_is_set_aside_and_the_previous_one_resumes(corpus, reference, tmp_path, kind, capsys):  # noqa: F811
    root, want = reference
    run = tmp_path / "run"
    shutil.copytree(root / "stopped", run)
    DAMAGE[kind](run / "checkpoints" / "4")
    result = run_in_process(corpus, run, steps=6, checkpoint_every=2)
    assert result.first_step == 3 and result.losses == [want[s] for s in range(3, 7)]  # bitwise, fp32 CPU
    out = capsys.readouterr().out
    assert "checkpoint step 4 is damaged:" in out and "resuming from" in out and "(step 2)" in out
    aside = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("4.corrupt-")]
    assert len(aside) == 1  # moved, never deleted
    assert (run / "checkpoint_integrity" / f"{aside[0]}.json").is_file()  # its record moved along with it
    assert losses_from_jsonl(run) == want


def test_when_no_step_restores_the_run_stops_listing_what_was_tried(corpus, reference, tmp_path):  # noqa: F811
    root, _ = reference
    run = tmp_path / "run"
    shutil.copytree(root / "stopped", run)
    for step in (2, 4):
        DAMAGE["deleted _METADATA"](run / "checkpoints" / str(step))
    with pytest.raises(CheckpointsDamaged, match=r"no checkpoint in .* restores .*step 4: .*; step 2: "):
        run_in_process(corpus, run, steps=6, checkpoint_every=2)


def test_integrity_records_name_the_damaged_file(reference, tmp_path):
    from llama_jax.checkpoint.run import RunCheckpoints

    root, _ = reference
    run = tmp_path / "run"
    shutil.copytree(root / "stopped", run)
    record = json.loads((run / "checkpoint_integrity" / "4.json").read_text())
    assert any(name.startswith("params/") for name in record) and any(name.startswith("meta/") for name in record)
    DAMAGE["zeroed params file"](run / "checkpoints" / "4")
    ckpts = RunCheckpoints(run, keep=5)
    problem = ckpts.damage(4)
    assert problem.startswith(f"file {largest_file(run / 'checkpoints' / '4' / 'params')}") and "CRC-32" in problem
    assert ckpts.damage(2) is None
    ckpts.close()


def test_a_record_left_by_a_pruned_step_is_forgotten_when_the_run_reopens(reference, tmp_path):
    """A step number saved again (after every kept step was set aside, the run restarts from scratch) must
    not be judged against the record of the pruned step it once was: opening the run drops such records."""
    from llama_jax.checkpoint.run import RunCheckpoints

    root, _ = reference
    run = tmp_path / "run"
    shutil.copytree(root / "stopped", run)
    shutil.copy(run / "checkpoint_integrity" / "2.json", run / "checkpoint_integrity" / "8.json")  # step 8 pruned
    ckpts = RunCheckpoints(run, keep=5)
    assert sorted(p.name for p in (run / "checkpoint_integrity").iterdir()) == ["2.json", "4.json"]
    ckpts.close()
