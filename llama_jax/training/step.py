"""The update rule: AdamW as in the LLaMA paper, the one training step and the evaluation step, jitted.

AdamW: β (0.9, 0.95), ε 1e-8, weight decay 0.1 on matrices only, global-norm clipping at 1.0, linear
warmup then cosine decay to 10% of the peak learning rate (`OptimizerConfig`, `make_optimizer`).

The steps are pure functions of (state, batch): the single-device run, every mesh, and the Trainer all
jit these same functions (`jit_train_step`, `jit_eval_step`: explicit input and output shardings from
the rules, the rules and mesh active while they trace, the attention implementation resolved for the
mesh and the batch), so there is never a second copy of the update rule. Optimizer-state shardings are
derived from the parameters' (the moments mirror the parameter tree).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from llama_jax.model import api, transformer
from llama_jax.model.attention import resolve_attention
from llama_jax.model.config import ModelConfig
from llama_jax.model.lora import LoraConfig, adapter_axes, adapter_shapes, merge, unmerged
from llama_jax.parallel.logical import Rules
from llama_jax.parallel.mesh import batch_sharding, named, replicated, specs_for, under
from llama_jax.parallel.platform import platform_of
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


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def batch_nll(cfg: ModelConfig, params: Any, batch: dict, lora_path=None) -> tuple[jax.Array, jax.Array]:
    """(sum of masked NLL, number of loss tokens) of a packed batch (see `llama_jax.data`); `lora_path`:
    unmerged adapters on `params` (`lora.unmerged`)."""
    log_probs, _ = transformer.target_log_probs(cfg, params, batch["inputs"], batch["targets"],
                                                positions=batch.get("positions"),
                                                segment_ids=batch.get("segment_ids"), lora=lora_path)
    mask = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(log_probs * mask), jnp.sum(mask)


def _split_micro_batches(batch: dict, n: int) -> dict:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} micro-batches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(split, batch)


def _weights(params: Any, frozen: Any, lora: LoraConfig | None) -> Any:
    """The model's weights: `params` themselves, or with LoRA the frozen base adapted by `params`."""
    return params if lora is None else merge(frozen, params, lora)


def _training_nll(params: Any, batch: dict, micro_batch: jax.Array | int, frozen: Any, model_cfg: ModelConfig,
                  lora: LoraConfig | None, seed: int, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`batch_nll` in training: with LoRA dropout the adapters run unmerged, their input masks drawn from
    (seed, step, micro-batch index); otherwise on the merged weights (one matmul per projection, nothing
    random drawn)."""
    if lora is not None and lora.dropout > 0:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro_batch)
        return batch_nll(model_cfg, frozen, batch, unmerged(params, lora, key))
    return batch_nll(model_cfg, _weights(params, frozen, lora), batch)


def train_step(state: TrainState, batch: dict, frozen: Any = None, *, model_cfg: ModelConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule | None = None,
               micro_batches: int = 1, lora: LoraConfig | None = None, seed: int = 0) -> tuple[TrainState, dict]:
    """One AdamW update on the mean token loss of `batch`.

    With `micro_batches` > 1 the rows are processed in equal chunks whose gradient *sums* are
    accumulated and divided by the total token count at the end: the same update as one large batch,
    at the activation memory of one chunk. With `lora`, `state.params` are the adapters and `frozen` the
    base weights: the loss is the adapted model's and only the adapters (and their moments) change.
    Randomness (LoRA dropout) comes from (`seed`, state.step, micro-batch index) alone, so a run
    resumed from a checkpoint draws the same masks as the uninterrupted one.
    """
    nll_grad = jax.value_and_grad(functools.partial(_training_nll, frozen=frozen, model_cfg=model_cfg, lora=lora,
                                                    seed=seed, step=state.step), has_aux=True)

    if micro_batches == 1:
        (nll_sum, tokens), grad_sum = nll_grad(state.params, batch, 0)
    else:
        def accumulate(carry, micro_and_index):
            micro, index = micro_and_index
            (nll, count), grads = nll_grad(state.params, micro, index)
            acc_nll, acc_count, acc_grads = carry
            return (acc_nll + nll, acc_count + count, jax.tree.map(jnp.add, acc_grads, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (nll_sum, tokens, grad_sum), _ = jax.lax.scan(
            accumulate, (jnp.zeros(()), jnp.zeros(()), zeros),
            (_split_micro_batches(batch, micro_batches), jnp.arange(micro_batches)))

    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)  # clip, AdamW: make_optimizer
    params = optax.apply_updates(state.params, updates)
    # The share of the batch's positions that are targets: ~1 in pretraining, the answers' share in fine-tuning.
    metrics = {"loss": nll_sum / denom, "grad_norm": optax.tree.norm(grads), "tokens": tokens,
               "target_share": tokens / batch["loss_mask"].size}
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict, frozen: Any = None, *, model_cfg: ModelConfig,
              lora: LoraConfig | None = None) -> dict:
    """Sums over a batch, to be added across batches: NLL (nats), loss tokens."""
    nll_sum, tokens = batch_nll(model_cfg, _weights(params, frozen, lora), batch)
    return {"nll_sum": nll_sum, "tokens": tokens}


def trainable_specs(model_cfg: ModelConfig, rules: Rules, mesh_shape: dict[str, int],
                    lora: LoraConfig | None = None) -> Any:
    """PartitionSpecs of what is trained: every parameter, or with LoRA the adapters."""
    if lora is None:
        return api.param_specs(model_cfg, rules, mesh_shape)
    return specs_for(adapter_axes(model_cfg, lora), adapter_shapes(model_cfg, lora), rules, mesh_shape)


def train_state_specs(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, rules: Rules,
                      mesh_shape: dict[str, int], lora: LoraConfig | None = None) -> TrainState:
    """PartitionSpecs of the whole state on a mesh of `mesh_shape` (no devices needed)."""
    params = trainable_specs(model_cfg, rules, mesh_shape, lora)
    shapes = None if lora is None else adapter_shapes(model_cfg, lora)
    return TrainState(step=PartitionSpec(), params=params,
                      opt_state=opt_state_specs(params, optimizer, model_cfg, shapes))


def train_state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                          rules: Rules, lora: LoraConfig | None = None) -> TrainState:
    return named(mesh, train_state_specs(model_cfg, optimizer, rules, dict(mesh.shape), lora))


def create_train_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                       rules: Rules, seed: int = 0) -> TrainState:
    """Random parameters and fresh optimizer state, each created directly in its shards.

    The initialiser is one jitted program whose outputs carry the target shardings, so XLA computes
    only each device's slice (partitionable threefry): nothing is ever whole on one device or host, and
    the values equal a single-device `api.init_params(model_cfg, seed)`.
    """
    shardings = train_state_shardings(model_cfg, optimizer, mesh, rules)
    init = jax.jit(lambda: init_train_state(api.init_params(model_cfg, seed), optimizer), out_shardings=shardings)
    return under(mesh, rules, init)()


def _attention_for(model_cfg: ModelConfig, mesh: Mesh, *, training: bool) -> Callable[[dict], ModelConfig]:
    """`batch -> model_cfg` with its attention implementation resolved for the program being traced
    (`model.attention.resolve_attention`): the platform of `mesh`, the batch's sequence length and whether
    it has segment ids. Called once per trace, i.e. once per program."""
    platform = platform_of(mesh)
    return lambda batch: resolve_attention(model_cfg, platform, seq_len=batch["inputs"].shape[1],
                                           segments="segment_ids" in batch, training=training)


def jit_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                   *, schedule: optax.Schedule | None = None, micro_batches: int = 1,
                   donate: bool = True, lora: LoraConfig | None = None, seed: int = 0) -> Callable:
    """`train_step` jitted for `mesh`: `(state, batch) -> (state, metrics)`, with LoRA
    `(state, batch, frozen_base) -> (state, metrics)`.

    The state keeps its shardings from step to step; with `donate` its old buffers are reused for the
    new one (do not touch the input state after the call). Metrics come back replicated.
    """
    state_sh = train_state_shardings(model_cfg, optimizer, mesh, rules, lora)
    resolved = _attention_for(model_cfg, mesh, training=True)

    def step(state, batch, frozen=None):
        return train_step(state, batch, frozen, model_cfg=resolved(batch), optimizer=optimizer, schedule=schedule,
                          micro_batches=micro_batches, lora=lora, seed=seed)

    frozen_sh = () if lora is None else (api.param_shardings(model_cfg, mesh, rules),)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sharding(mesh, rules), *frozen_sh),
                     out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,) if donate else ())
    return under(mesh, rules, jitted)


def jit_eval_step(model_cfg: ModelConfig, mesh: Mesh, rules: Rules,
                  lora: LoraConfig | None = None) -> Callable:
    """`eval_step` jitted for `mesh`: `(params, batch) -> {nll_sum, tokens}`; with LoRA
    `(adapters, batch, frozen_base)`."""
    resolved = _attention_for(model_cfg, mesh, training=False)

    def step(params, batch, frozen=None):
        return eval_step(params, batch, frozen, model_cfg=resolved(batch), lora=lora)

    trained = named(mesh, trainable_specs(model_cfg, rules, dict(mesh.shape), lora))
    frozen_sh = () if lora is None else (api.param_shardings(model_cfg, mesh, rules),)
    jitted = jax.jit(step, in_shardings=(trained, batch_sharding(mesh, rules), *frozen_sh),
                     out_shardings=replicated(mesh))
    return under(mesh, rules, jitted)
