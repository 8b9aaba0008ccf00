"""Loss-spike detection: the signal for PaLM's remedy (roll back, skip the offending data, continue).

Chowdhery et al. (2022, §5.1) saw the loss spike about 20 times in the 540B run, irregularly and not
always from bad data alone: the same batches were harmless at another point of training. Their remedy
was to restart from a checkpoint about 100 steps before the spike and skip 200–500 batches; the LLaMA
runs needed the same kind of intervention. The training loop does this automatically when detection is
configured; this module only decides *when*.

A step is anomalous when its loss exceeds `loss_factor` × the mean loss of the last `window` normal
steps, or its gradient norm exceeds `grad_norm_factor` × their mean gradient norm (each test is on
when its factor is set). `patience` consecutive anomalous steps make a spike: one bad batch that the
model absorbs is tolerated; a loss that jumps and stays up is not (a stuck loss with zero gradients is
caught by the loss test alone). Anomalous steps never enter the means, and the test starts once `window`
normal steps have been seen. The detector's state (the recent normal steps) is saved with each
checkpoint, so detection after a resume or a rollback behaves as if the run had never stopped.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from llama_jax.utils.config_io import ConfigError


@dataclass(frozen=True)
class SpikeConfig:
    """`spikes:` in the training config; off unless `loss_factor` or `grad_norm_factor` is set."""

    loss_factor: float = 0.0  # anomalous when loss > loss_factor × running mean; 0 = this test off
    grad_norm_factor: float = 0.0  # anomalous when grad_norm > grad_norm_factor × running mean; 0 = off
    window: int = 100  # normal steps in the running means
    patience: int = 3  # consecutive anomalous steps that make a spike
    max_rollbacks: int = 10  # per invocation; one more spike ends the run as diverged (exit 1)

    def __post_init__(self):
        for key in ("loss_factor", "grad_norm_factor"):
            value = getattr(self, key)
            if not (math.isfinite(value) and (value == 0 or value > 1)):
                raise ConfigError(f"spikes.{key} must be 0 (off) or a finite number > 1, got {value}")
        for key in ("window", "patience", "max_rollbacks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"spikes.{key} must be >= 1, got {getattr(self, key)}")

    @property
    def enabled(self) -> bool:
        return bool(self.loss_factor or self.grad_norm_factor)


@dataclass(frozen=True)
class Spike:
    """`patience` anomalous steps ending at `step`; `first_step` is the first of them."""

    first_step: int
    step: int
    loss: float
    loss_mean: float
    grad_norm: float
    grad_norm_mean: float


class SpikeDetector:
    """Feed every finished step to `observe`; it returns a Spike when one is complete."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self._recent: deque[tuple[float, float]] = deque(maxlen=cfg.window)  # (loss, grad_norm) of normal steps
        self._streak: list[int] = []

    def observe(self, step: int, loss: float, grad_norm: float) -> Spike | None:
        if not self.cfg.enabled:
            return None
        if len(self._recent) < self.cfg.window:
            self._recent.append((loss, grad_norm))
            return None
        loss_mean = math.fsum(l for l, _ in self._recent) / len(self._recent)
        grad_norm_mean = math.fsum(g for _, g in self._recent) / len(self._recent)
        anomalous = ((self.cfg.loss_factor and loss > self.cfg.loss_factor * loss_mean)
                     or (self.cfg.grad_norm_factor and grad_norm > self.cfg.grad_norm_factor * grad_norm_mean))
        if not anomalous:
            self._streak = []
            self._recent.append((loss, grad_norm))
            return None
        self._streak.append(step)
        if len(self._streak) < self.cfg.patience:
            return None
        spike = Spike(self._streak[0], step, loss, loss_mean, grad_norm, grad_norm_mean)
        self._streak = []
        return spike

    def get_state(self) -> dict:
        """JSON for a checkpoint's meta: the recent normal steps as [[loss, grad_norm], ...] and the steps
        of an anomalous streak in progress (a checkpoint taken inside one is then known to be suspect)."""
        return {"recent": [[l, g] for l, g in self._recent], "streak": list(self._streak)}

    def set_state(self, state: dict) -> None:
        """Continue from `get_state`'s value (validated by `llama_jax.checkpoint.run.read_meta`)."""
        self._recent = deque(((float(l), float(g)) for l, g in state["recent"]), maxlen=self.cfg.window)
        self._streak = [int(s) for s in state["streak"]]


def describe_spike(spike: Spike, cfg: SpikeConfig) -> str:
    """`loss spike: loss 7.1 > 1.5 × running mean 3.2 ... since step 8` (what crossed which threshold)."""
    crossed = []
    if cfg.loss_factor and spike.loss > cfg.loss_factor * spike.loss_mean:
        crossed.append(f"loss {spike.loss:.4g} > {cfg.loss_factor:g} × running mean {spike.loss_mean:.4g}")
    if cfg.grad_norm_factor and spike.grad_norm > cfg.grad_norm_factor * spike.grad_norm_mean:
        crossed.append(f"gradient norm {spike.grad_norm:.4g} > {cfg.grad_norm_factor:g} × running mean "
                       f"{spike.grad_norm_mean:.4g}")
    return f"loss spike ({' and '.join(crossed)}; anomalous for {cfg.patience} steps since step {spike.first_step})"
