"""Loss-spike rollback: a window of garbage batches makes the loss jump; the run rolls back to the last
checkpoint from before the spike, skips the data since then and continues.

Oracle: an uninterrupted run, without spike detection, on a data stream from which the test itself
removed exactly those batches (a wrapper around the real iterator, not the trainer's skipping). Both runs
are fp32 on one CPU device, so their losses must agree bitwise.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import llama_jax.data
from llama_jax.training.loop import TrainingDiverged
from llama_jax.training.spikes import SpikeConfig, SpikeDetector
from llama_jax.utils.config_io import ConfigError, from_dict
from test_train import compilation_cache, corpus, losses_from_jsonl, run_in_process  # noqa: F401  (fixtures)

STEPS = 14
POISONED = (8, 9)  # 0-based batch numbers: the batches of steps 9 and 10


class EditedStream:
    """The real training iterator with some batches replaced by random tokens (`poison`) or left out
    (`drop`), by their batch number in the real stream; state passes through unchanged."""

    def __init__(self, inner, poison=(), drop=()):
        self.inner, self.poison, self.drop = inner, set(poison), set(drop)

    def __iter__(self):
        return self

    def __next__(self):
        while (index := self.inner.get_state()["batch"]) in self.drop:
            next(self.inner)
        batch = next(self.inner)
        if index in self.poison:
            rng = np.random.default_rng(index)
            for key in ("inputs", "targets"):
                batch[key] = rng.integers(3, 300, size=batch[key].shape).astype(batch[key].dtype)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def edit_data(monkeypatch, poison=(), drop=()):
    """Make the next runs' training data an EditedStream of the real one."""
    real = llama_jax.data.make_train_iterator
    monkeypatch.setattr(llama_jax.data, "make_train_iterator", lambda *a, **k: EditedStream(real(*a, **k), poison, drop))


@pytest.fixture
def edited_data(monkeypatch):
    """Call with (poison, drop) to make the next runs' training data an EditedStream."""
    return lambda poison=(), drop=(): edit_data(monkeypatch, poison, drop)


@pytest.fixture(scope="module")
def oracle(corpus, tmp_path_factory):  # noqa: F811
    """oracle(drop): the losses of an uninterrupted run, without detection, whose stream lacks `drop`."""
    cache = {}

    def losses(drop):
        if tuple(drop) not in cache:
            with pytest.MonkeyPatch.context() as monkeypatch:
                edit_data(monkeypatch, drop=drop)
                cache[tuple(drop)] = run_in_process(corpus, tmp_path_factory.mktemp("oracle") / "run", steps=STEPS,
                                                    checkpoint_every=100).losses
        return cache[tuple(drop)]
    return losses


DETECTION = {
    "loss": {"spikes.loss_factor": 1.3},
    "grad_norm": {"spikes.grad_norm_factor": 1.5},
}


@pytest.mark.parametrize("checkpoint_every, rolled_back_to, set_aside", [(4, 8, []), (3, 6, ["9"])])
@pytest.mark.parametrize("signal", sorted(DETECTION))
def test_a_spike_rolls_back_and_skips_the_window(corpus, edited_data, oracle, tmp_path, capsys, signal,  # noqa: F811
                                                 checkpoint_every, rolled_back_to, set_aside):
    """checkpoint_every=3 also saves step 9, inside the spike: it is set aside, and step 6 used."""
    skipped = list(range(rolled_back_to, POISONED[-1] + 1))  # the batches of steps rolled_back_to + 1 .. 10
    want = oracle(skipped)
    edited_data(poison=POISONED)
    run = tmp_path / "run"
    result = run_in_process(corpus, run, steps=STEPS, checkpoint_every=checkpoint_every, **DETECTION[signal],
                            **{"spikes.window": 3, "spikes.patience": 2})
    assert result.status == "completed" and result.first_step == 1
    assert result.losses == want  # bitwise: the same updates on the same data
    assert losses_from_jsonl(run) == dict(enumerate(want, 1))
    events = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "spike"]
    assert len(events) == 1
    assert events[0]["detected_at_step"] == 10 and events[0]["first_anomalous_step"] == 9
    assert events[0]["rolled_back_to_step"] == rolled_back_to
    assert events[0]["skipped_batches"] == [skipped[0], skipped[-1]]
    out = capsys.readouterr().out
    assert f"step 10: loss spike ({'loss' if signal == 'loss' else 'gradient norm'} " in out
    assert f"rolled back to step {rolled_back_to}, skipping data batches {skipped[0]}–{skipped[-1]}" in out
    aside = sorted(p.name.split(".")[0] for p in (run / "checkpoints").iterdir() if ".spike-" in p.name)
    assert aside == set_aside


def test_a_run_resumed_after_a_rollback_continues_exactly(corpus, edited_data, oracle, tmp_path):  # noqa: F811
    """The checkpoints saved after a rollback record the data position past the skipped batches and the
    detector's history: stopping at step 12 and resuming gives the oracle's losses again."""
    want = oracle([8, 9])
    edited_data(poison=POISONED)
    settings = {"steps": STEPS, "checkpoint_every": 4, **DETECTION["loss"], "spikes.window": 3, "spikes.patience": 2}
    stopped = run_in_process(corpus, tmp_path / "run", stop_at_step=12, **settings)
    resumed = run_in_process(corpus, tmp_path / "run", **settings)
    assert stopped.status == "stopped" and resumed.first_step == 13
    assert stopped.losses + resumed.losses == want
    assert losses_from_jsonl(tmp_path / "run") == dict(enumerate(want, 1))


def test_the_same_garbage_without_detection_is_trained_on(corpus, edited_data, tmp_path):  # noqa: F811
    """The injected spike is real: without detection the losses of steps 9 and 10 jump."""
    edited_data(poison=POISONED)
    losses = run_in_process(corpus, tmp_path / "run", steps=10, checkpoint_every=100).losses
    assert min(losses[8:10]) > 1.3 * np.mean(losses[5:8]), losses


def test_a_spike_with_no_checkpoint_before_it_stops_the_run(corpus, edited_data, tmp_path):  # noqa: F811
    edited_data(poison=POISONED)
    with pytest.raises(TrainingDiverged, match=r"step 10: loss spike .* no checkpoint from before step 9 is left"):
        run_in_process(corpus, tmp_path / "run", steps=STEPS, checkpoint_every=12, keep_checkpoints=1,
                       **{"spikes.loss_factor": 1.3, "spikes.window": 3, "spikes.patience": 2})


def test_the_detector_needs_patience_consecutive_anomalies():
    detector = SpikeDetector(SpikeConfig(loss_factor=2.0, window=2, patience=2))
    for step, loss in enumerate([4.0, 4.0, 9.0, 4.0, 9.0], 1):  # two anomalies, not consecutive
        assert detector.observe(step, loss, 1.0) is None
    spike = detector.observe(6, 8.1, 1.0)  # mean of the normal steps 2 and 4 is 4.0
    assert (spike.first_step, spike.step, spike.loss_mean) == (5, 6, 4.0)
    state = json.loads(json.dumps(detector.get_state()))
    assert state == {"recent": [[4.0, 1.0], [4.0, 1.0]], "streak": []}


@pytest.mark.parametrize("values, message", [
    ({"loss_factor": 0.5}, "spikes.loss_factor must be 0 (off) or a finite number > 1, got 0.5"),
    ({"grad_norm_factor": float("inf")}, "spikes.grad_norm_factor: expected a finite number, got inf"),
    ({"patience": 0}, "spikes.patience must be >= 1, got 0"),
    ({"window": -1}, "spikes.window must be >= 1"),
    ({"loss_factor": "high"}, "spikes.loss_factor: expected float, got str"),
    ({"factor": 2}, "unknown key spikes.factor"),
])
def test_spike_settings_are_checked_at_load(values, message):
    from llama_jax.training.config import TrainConfig

    with pytest.raises(ConfigError) as error:
        from_dict(TrainConfig, {"spikes": values})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_rollback_needs_an_older_checkpoint_to_be_kept():
    from llama_jax.training.config import load_train_config

    with pytest.raises(ConfigError, match=r"spikes.patience=3 needs a checkpoint .* \(1 × 2\) must exceed it"):
        load_train_config(None, ["spikes.loss_factor=2", "keep_checkpoints=1", "checkpoint_every=2"])
