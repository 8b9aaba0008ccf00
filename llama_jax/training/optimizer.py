"""AdamW as in the LLaMA paper: β (0.9, 0.95), ε 1e-8, weight decay 0.1 on matrices only, global-norm
clipping at 1.0, linear warmup then cosine decay to 10% of the peak learning rate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from llama_jax.model import api
from llama_jax.model.config import ModelConfig
from llama_jax.utils.config_io import ConfigError


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup + cosine decay and global-norm clipping; defaults are the LLaMA paper's."""

    peak_lr: float = 3e-4
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1  # of peak_lr, reached at step `steps` (the last update uses lr(steps - 1))
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices (embeddings included), never on norm scales
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.peak_lr <= 0:
            raise ConfigError(f"optimizer.peak_lr must be > 0, got {self.peak_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for key in ("b1", "b2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optimizer.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.eps <= 0 or self.weight_decay < 0 or self.clip_norm <= 0:
            raise ConfigError("optimizer.eps and optimizer.clip_norm must be > 0, weight_decay >= 0")


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to peak_lr, then cosine to min_lr_ratio·peak_lr at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.peak_lr * cfg.min_lr_ratio)


def decay_mask(params: Any) -> Any:
    """True for every parameter but the RMSNorm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", k)) for k in path), params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def opt_state_specs(param_spec_tree: Any, optimizer: optax.GradientTransformation, model_cfg: ModelConfig,
                    shapes: Any = None) -> Any:
    """Optimizer-state specs derived from the params' (moments mirror the params); scalars replicated.
    `shapes`: the trained tree's shapes when it is not the model's params (LoRA adapters)."""
    abstract_state = jax.eval_shape(optimizer.init, api.param_shapes(model_cfg) if shapes is None else shapes)
    return optax.tree_map_params(optimizer, lambda _, spec: spec, abstract_state, param_spec_tree,
                                 transform_non_params=lambda _: PartitionSpec(),
                                 is_leaf=lambda x: isinstance(x, PartitionSpec))
