"""LoRA (Hu et al., 2021): low-rank adapters on the projection matrices, the base weights frozen.

For a target projection W [in, out] (stacked over layers: [L, in, out]) the adapted weight is
W + (alpha / rank) · A B with A [L, in, rank] and B [L, rank, out]; B starts at zero, so the adapted model
starts as the base model. Adapters travel as their own pure dict, shaped like the params' target branches:
{"layers": {"attention": {"wq": {"a": ..., "b": ...}, ...}}}. Training computes the adapted weights from
(base, adapters) inside the step (`merge`), so the model code is unchanged and gradients reach only the
adapters; conversion merges them once for export. With `dropout` > 0 the adapters' input is dropped out
(x W + scale · dropout(x) A B, as in the paper and Hugging Face peft), which no merged weight can express:
the training step then runs the model with the adapters unmerged (`transformer.LoraPath`); evaluation,
generation and export never drop out and use the merged weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from llama_jax.model import api
from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import LoraPath
from llama_jax.utils.config_io import ConfigError
from llama_jax.utils.dtypes import canonical
from llama_jax.utils.trees import flatten, unflatten

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraConfig:
    """rank 0: off (full fine-tuning). `targets`: which projections get adapters. `dropout`: the
    probability of zeroing each input feature of an adapter in training. `base_dtype`: "" keeps the frozen
    base in the model's param_dtype, "bfloat16" halves its memory."""

    rank: int = 0
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    dropout: float = 0.0
    base_dtype: str = ""

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:  # NaN fails too
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"lora.targets: {unknown or 'none'}; expected some of {list(TARGETS)}")
        if self.base_dtype:  # any spelling of bfloat16 (utils.dtypes), stored canonical
            object.__setattr__(self, "base_dtype", canonical(self.base_dtype, "lora.base_dtype", ("bfloat16",)))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_paths(cfg: ModelConfig, lora: LoraConfig) -> list[tuple[str, ...]]:
    """Paths of the stacked [L, in, out] kernels that get adapters."""
    return [p for p, shape in api.flat_param_shapes(cfg).items()
            if len(p) >= 2 and p[-2] in lora.targets and p[-1] == "kernel" and len(shape) == 3]


def adapter_shapes(cfg: ModelConfig, lora: LoraConfig) -> dict:
    """ShapeDtypeStruct of every adapter (in the model's param_dtype), as a pure dict."""
    shapes, dtype = api.flat_param_shapes(cfg), cfg.weight_dtype
    flat = {}
    for path in target_paths(cfg, lora):
        layers, fan_in, fan_out = shapes[path]
        flat[path[:-1] + ("a",)] = jax.ShapeDtypeStruct((layers, fan_in, lora.rank), dtype)
        flat[path[:-1] + ("b",)] = jax.ShapeDtypeStruct((layers, lora.rank, fan_out), dtype)
    return unflatten(flat)


def adapter_axes(cfg: ModelConfig, lora: LoraConfig) -> dict:
    """Logical axis names: A shares its kernel's (layers, in) axes, B its (layers, out); rank is whole."""
    axes = flatten(api.param_axes(cfg))
    flat = {}
    for path in target_paths(cfg, lora):
        layers, fan_in, fan_out = axes[path]
        flat[path[:-1] + ("a",)] = (layers, fan_in, None)
        flat[path[:-1] + ("b",)] = (layers, None, fan_out)
    return unflatten(flat)


def adapter_count(cfg: ModelConfig, lora: LoraConfig) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(adapter_shapes(cfg, lora)))


def init_adapters(cfg: ModelConfig, lora: LoraConfig, seed: int = 0) -> dict:
    """A ~ normal(0, 1/in) (a fresh kernel's scale), B = 0: the adapted model starts as the base model."""
    shapes = flatten(adapter_shapes(cfg, lora))
    paths = target_paths(cfg, lora)
    flat = {}
    for key, path in zip(jax.random.split(jax.random.key(seed), len(paths)), paths):
        a, b = shapes[path[:-1] + ("a",)], shapes[path[:-1] + ("b",)]
        flat[path[:-1] + ("a",)] = jax.random.normal(key, a.shape, a.dtype) / math.sqrt(a.shape[1])
        flat[path[:-1] + ("b",)] = jnp.zeros(b.shape, b.dtype)
    return unflatten(flat)


def adapted(weight, a, b, scale: float, xp=jnp):
    """W + scale · A B in fp32 (batched over a leading layers axis if there is one); `xp` is jax.numpy
    in training and numpy in conversion, so both apply the one rule."""
    return weight.astype(xp.float32) + scale * xp.matmul(a.astype(xp.float32), b.astype(xp.float32))


def merge(params: dict, adapters: dict, lora: LoraConfig) -> dict:
    """The adapted weights for every adapted kernel, in the adapters' dtype (the model's param_dtype), so
    a bf16 base does not round the adapters' contribution away."""
    flat, deltas = dict(flatten(params)), flatten(adapters)
    for path, weight in list(flat.items()):
        a = deltas.get(path[:-1] + ("a",))
        if a is not None:
            flat[path] = adapted(weight, a, deltas[path[:-1] + ("b",)], lora.scale).astype(a.dtype)
    return unflatten(flat)


def unmerged(adapters: dict, lora: LoraConfig, key: jax.Array) -> LoraPath:
    """The adapters for a training forward pass with dropout on their inputs (`transformer.apply(...,
    lora=)` on the frozen base weights); `key` seeds the pass's masks."""
    return LoraPath(adapters, key, lora.scale, lora.dropout)
