"""`train(cfg)`: one invocation of the training run in `cfg.run_dir`, resumable at any step.

It joins the multi-host job if one is configured, makes sure the run directory is writable, takes the
run directory's lock (`training.run_lock`: one job trains there at a time), refuses a run directory
that holds another model, and hands over to `training.trainer.Trainer`, which sets up, restores the
state (newest intact checkpoint, else `init_from`, else random), trains up to `cfg.last_step` and
evaluates. What `train` returns (`TrainResult`) and the error a diverged run raises (`TrainingDiverged`)
are part of this entry point.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import yaml

from llama_jax.model.config import EXECUTION_FIELDS
from llama_jax.parallel.distributed import initialize
from llama_jax.training.config import TrainConfig
from llama_jax.training.run_lock import RunLock
from llama_jax.training.trainer import Trainer, TrainingDiverged, TrainResult
from llama_jax.utils.config_io import ConfigError, to_dict

__all__ = ["TrainResult", "TrainingDiverged", "train"]  # the entry point: what it returns and raises


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run directory and prove it writable, or fail with the reason, before any compile."""
    run_dir = Path(cfg.run_dir).expanduser()
    probe = run_dir / f".write-test-{jax.process_index()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} is not writable: {e.strerror or e}") from None
    return run_dir


def check_same_model(run_dir: Path, cfg: TrainConfig) -> None:
    """Resuming a run with another model is an error naming the first differing model field."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved = (yaml.safe_load(path.read_text()) or {}).get("model", {})
    for key, value in to_dict(cfg.model).items():
        if key not in EXECUTION_FIELDS and saved.get(key) != value:
            raise ConfigError(f"run_dir {run_dir} holds a run with model.{key}={saved.get(key)!r}, this config "
                              f"has {value!r}: use another run_dir or the run's own model config")


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the training run `cfg.run_dir` up to `cfg.last_step`, holding its lock."""
    initialize(cfg.distributed)
    main = jax.process_index() == 0
    say = functools.partial(print, flush=True) if main else lambda *_: None
    run_dir = prepare_run_dir(cfg)
    with RunLock(run_dir, heartbeat_s=cfg.lock_heartbeat_s, stale_after_s=cfg.lock_stale_after_s, say=say):
        check_same_model(run_dir, cfg)
        return Trainer(cfg, run_dir, main, say).run()
