"""Nothing read unverified: every reader of a run or params directory checks the files against their integrity
record first. On a run whose newest step is damaged (a bit flip in its largest file) or unrecorded, convert,
eval and `init_from` read the previous step with one warning line; on a damaged params directory they stop
with one line naming the file (exit 2). NaN restored from a step is damage, never divergence.

Oracles: the params saved at each step (what a reader must return, bit for bit), the loss of the first
batch under them computed outside the loop, an uninterrupted run (resume after the damaged step).
"""
from __future__ import annotations

import importlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from llama_jax.checkpoint.integrity import CheckpointDamaged
from llama_jax.checkpoint.layout import step_record
from llama_jax.checkpoint.params import load_params, save_params
from llama_jax.checkpoint.run import RunCheckpoints
from llama_jax.cli import convert as convert_cli
from llama_jax.model import api
from llama_jax.training.config import load_train_config
from llama_jax.utils.config_io import to_dict
from llama_jax.utils.trees import flatten
from test_checkpoint_fallback import largest_file, reference  # noqa: F401  (fixture)
from test_train import compilation_cache, corpus, overrides, run_in_process  # noqa: F401


def flip_bits(path):
    """Invert one byte in the middle of `path` (same size: only the CRC-32 can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "bit flip in the largest file":
        lambda run, step: flip_bits(largest_file(run / "checkpoints" / str(step) / "params")),
    "no integrity record": lambda run, step: step_record(run, step).unlink(),
}
WHY = {"bit flip in the largest file": "changed since it was saved (CRC-32 differs)",
       "no integrity record": "has no integrity record"}


@pytest.fixture(scope="module")
def cfg(corpus):  # noqa: F811
    return load_train_config(None, overrides(corpus, "unused")).model


def write_run(run, cfg, corpus, steps: dict):  # noqa: F811
    """A run directory as the trainer leaves it: config.yaml, its tokenizer, steps saved by RunCheckpoints."""
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg), "seed": 0}))
    shutil.copyfile(corpus["tokenizer"], run / "tokenizer.model")
    ckpts = RunCheckpoints(run, keep=10)
    for step, params in steps.items():
        ckpts.save(step, params, {"mu": np.zeros(3)}, {"step": step})
    ckpts.close()


def assert_params_equal(got, want):
    got, want = flatten(jax.tree.map(np.asarray, got)), flatten(want)
    assert got.keys() == want.keys()
    for path in want:
        assert np.array_equal(got[path], want[path]), path


def first_batch_loss(corpus, cfg, params) -> float:  # noqa: F811
    from llama_jax.data import DataConfig, SourceConfig, make_train_iterator
    from llama_jax.data.tokenizer import load_tokenizer
    from llama_jax.training.step import batch_nll

    data = make_train_iterator(DataConfig(sources=[SourceConfig(kind="text", path=corpus["train_dir"])]),
                               load_tokenizer(corpus["tokenizer"]), seq_len=32, global_batch_size=4)
    nll, tokens = batch_nll(cfg, params, next(data))
    return float(nll / tokens)


@pytest.fixture(scope="module")
def steps(cfg):
    return {1: jax.tree.map(np.asarray, api.init_params(cfg, 1)), 2: jax.tree.map(np.asarray, api.init_params(cfg, 2))}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_readers_of_a_run_take_the_newest_verified_step_with_one_warning(
        corpus, cfg, steps, tmp_path, kind, capsys):  # noqa: F811
    run = tmp_path / "run"
    write_run(run, cfg, corpus, steps)
    DAMAGE[kind](run, 2)

    assert_params_equal(load_params(run, cfg), steps[1])  # whole, numpy (conversion's path)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: {run}: reading step 1")
    assert "step 2 (" in warning[0] and WHY[kind] in warning[0]

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # into shards (evaluation's and init_from's path)
    assert_params_equal(load_params(run, cfg, shardings=jax.tree.map(lambda _: device, steps[1])), steps[1])

    assert convert_cli.main(["--to", "orbax", "--no-progress", str(run), str(tmp_path / "out")]) == 0
    assert "reading step 1" in capsys.readouterr().err
    assert_params_equal(load_params(tmp_path / "out", cfg), steps[1])

    eval_cli = importlib.import_module("eval")
    (tmp_path / "docs.txt").write_text("the cat sees the dog number 4.\nthe owl feeds the yak number 7.\n")
    save_params(tmp_path / "step1", steps[1], cfg, tokenizer_path=run / "tokenizer.model")
    args = ["--data", str(tmp_path / "docs.txt"), "--dtype", "fp32", "--distributed", "off"]
    assert eval_cli.main(["perplexity", str(run), *args]) == 0
    from_run = capsys.readouterr()
    assert "reading step 1" in from_run.err
    assert eval_cli.main(["perplexity", str(tmp_path / "step1"), *args]) == 0
    assert json.loads(from_run.out) == json.loads(capsys.readouterr().out)  # the previous step's weights


def test_records_are_written_when_a_save_commits_and_never_for_steps_found_on_disk(corpus, cfg, steps, tmp_path):  # noqa: F811
    """The record of a step exists as soon as its save is complete (before any later save or close), and a
    run reopened over a step without a record (killed before recording it) does not record that step."""
    run = tmp_path / "run"
    write_run(run, cfg, corpus, steps)
    step_record(run, 2).unlink()
    ckpts = RunCheckpoints(run, keep=10)
    ckpts.save(3, steps[1], {"mu": np.zeros(3)}, {"step": 3})
    ckpts.wait()
    assert step_record(run, 3).is_file() and not step_record(run, 2).exists()
    ckpts.save(4, steps[1], {"mu": np.zeros(3)}, {"step": 4})
    ckpts.close()
    assert step_record(run, 4).is_file() and not step_record(run, 2).exists()


def test_a_run_without_a_verified_step_is_one_error_listing_each_step(corpus, cfg, steps, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    write_run(run, cfg, corpus, steps)
    DAMAGE["bit flip in the largest file"](run, 2)
    DAMAGE["no integrity record"](run, 1)
    with pytest.raises(CheckpointDamaged, match=r"checkpoints: no verified step: step 2 \(file .* changed since it "
                                                r"was saved \(CRC-32 differs\)\); step 1 \(it has no integrity record"):
        load_params(run, cfg)


def test_init_from_a_run_with_a_damaged_latest_step_starts_from_the_previous_one(
        corpus, cfg, steps, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "source"
    write_run(run, cfg, corpus, steps)
    DAMAGE["bit flip in the largest file"](run, 2)
    result = run_in_process(corpus, tmp_path / "run", stop_at_step=1, init_from=str(run))
    assert result.losses[0] == pytest.approx(first_batch_loss(corpus, cfg, steps[1]), rel=1e-6)
    assert "reading step 1" in capsys.readouterr().err


def test_a_damaged_params_dir_stops_every_reader_naming_the_file(corpus, cfg, steps, tmp_path, capsys):  # noqa: F811
    ckpt = tmp_path / "ckpt"
    shutil.copyfile(corpus["tokenizer"], tmp_path / "tokenizer.model")
    save_params(ckpt, steps[1], cfg, tokenizer_path=tmp_path / "tokenizer.model")
    damaged = largest_file(ckpt / "params")
    flip_bits(damaged)
    line = f"{ckpt}: damaged: file {damaged} changed since it was saved (CRC-32 differs)"

    with pytest.raises(CheckpointDamaged) as err:
        load_params(ckpt, cfg)
    assert str(err.value) == line

    assert convert_cli.main(["--to", "hf", "--no-progress", str(ckpt), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == f"error: {line}\n" and not (tmp_path / "hf").exists()

    eval_cli = importlib.import_module("eval")
    (tmp_path / "docs.txt").write_text("the cat sees the dog.\n")
    assert eval_cli.main(["perplexity", str(ckpt), "--data", str(tmp_path / "docs.txt"), "--distributed", "off"]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"

    with pytest.raises(CheckpointDamaged, match="CRC-32 differs"):
        run_in_process(corpus, tmp_path / "run", stop_at_step=1, init_from=str(ckpt))


def test_a_params_dir_without_a_record_is_read_with_its_values_checked_finite(cfg, steps, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_params(ckpt, steps[1], cfg)
    (ckpt / "integrity.json").unlink()  # as written before records existed
    assert_params_equal(load_params(ckpt, cfg), steps[1])
    assert capsys.readouterr().err.startswith(f"warning: {ckpt} has no integrity.json")
    poisoned = tmp_path / "poisoned"
    save_params(poisoned, {**steps[1], "norm": {"scale": np.full_like(steps[1]["norm"]["scale"], np.nan)}}, cfg)
    (poisoned / "integrity.json").unlink()
    with pytest.raises(CheckpointDamaged, match=r"parameter norm\.scale holds NaN or inf: the checkpoint is damaged"):
        load_params(poisoned, cfg)


def test_nan_restored_from_a_recorded_step_is_damage_not_divergence(
        corpus, reference, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A step whose parameters went NaN in memory while the loss stayed finite is saved with a valid record;
    resuming sets it aside as damaged and continues from the step before, with the uninterrupted losses."""
    from llama_jax.training import trainer

    root, want = reference
    real = trainer.jit_train_step

    def poisoning(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def poisoned(state, batch):
            state, metrics = step_fn(state, batch)
            if int(state.step) == 4:
                state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
            return state, metrics
        return poisoned

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "jit_train_step", poisoning)
        run_in_process(corpus, run, steps=6, checkpoint_every=2, stop_at_step=4)
    assert step_record(run, 4).is_file()
    capsys.readouterr()
    result = run_in_process(corpus, run, steps=6, checkpoint_every=2)
    out = capsys.readouterr().out
    assert "checkpoint step 4 is damaged: parameter" in out and "holds NaN or inf" in out and "(step 2)" in out
    assert "peak_lr" not in out
    assert result.first_step == 3 and result.losses == [want[s] for s in range(3, 7)]  # bitwise, fp32 CPU
