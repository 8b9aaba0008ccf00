"""The model's weights as a plain tree, for training, evaluation, conversion and planning.

Weights travel as the model's pure dict (`nnx.to_pure_dict` of its parameters: nested dicts of arrays,
matrices [in, out], per-layer tensors stacked on a leading `layers` axis): optax, orbax, the converters
and the sharding rules all see that plain tree. Everything about its shapes is derived here, once per
config (cached: configs are frozen dataclasses), from the model definition itself:

    init_params(cfg, seed)  random weights as a pure dict           load_into      a dict into a module
    param_shapes(cfg)       ShapeDtypeStruct tree                   param_axes     logical-name tree
    flat_param_shapes(cfg)  {path: shape}                           param_count    exact count
    check_param_shapes      names and shapes against the config     param_specs / param_shardings

Building the model (`build`, `abstract`) and running it on such a dict (`apply`, `target_log_probs`) are
in `transformer`, beside the model.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import Transformer, abstract, build
from llama_jax.parallel.logical import Rules
from llama_jax.parallel.mesh import named, specs_for
from llama_jax.utils.trees import Path, dotted, flatten


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Randomly initialised weights as a pure dict (jit this with out_shardings to create them sharded)."""
    return nnx.to_pure_dict(nnx.state(build(cfg, seed), nnx.Param))


@functools.lru_cache(maxsize=None)
def _param_shapes(cfg: ModelConfig) -> dict:
    return jax.eval_shape(lambda: init_params(cfg))


def param_shapes(cfg: ModelConfig) -> dict:
    """`jax.ShapeDtypeStruct` of every parameter, as a pure dict (nothing allocated)."""
    return jax.tree.map(lambda x: x, _param_shapes(cfg))


@functools.lru_cache(maxsize=None)
def _param_axes(cfg: ModelConfig) -> dict:
    state = nnx.state(abstract(cfg), nnx.Param)
    names = jax.tree.map(lambda v: tuple(v.get_metadata()["axes"]), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(names)


def param_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a pure dict of tuples shaped like the params."""
    return jax.tree.map(lambda x: x, _param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def flat_param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """{parameter path: shape} of the model `cfg` describes."""
    return {path: tuple(leaf.shape) for path, leaf in flatten(_param_shapes(cfg)).items()}


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters, computed without allocating any."""
    return sum(math.prod(shape) for shape in flat_param_shapes(cfg).values())


def check_shapes(given: Mapping[Path, tuple[int, ...]], expected: Mapping[Path, tuple[int, ...]],
                 source: str) -> None:
    """Raise ValueError naming `source` and the first parameter that is missing, unexpected or misshapen."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        raise ValueError(f"{source}: parameter {dotted(missing[0])} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"{source}: unexpected parameter {dotted(unexpected[0])} ({len(unexpected)} in all)")
    for path, shape in expected.items():
        if tuple(given[path]) != tuple(shape):
            raise ValueError(f"{source}: parameter {dotted(path)} has shape {tuple(given[path])}, "
                             f"the config expects {tuple(shape)}")


def check_param_shapes(given: Mapping[Path, tuple[int, ...]], cfg: ModelConfig, source: str) -> None:
    """`given` {path: shape} against the model `cfg` describes; the error names `source` and the parameter."""
    check_shapes(given, flat_param_shapes(cfg), source)


def param_specs(cfg: ModelConfig, rules: Rules, mesh_shape: dict[str, int]) -> dict:
    """PartitionSpec of every parameter under `rules`; an error names the parameter if a split is uneven."""
    return specs_for(_param_axes(cfg), _param_shapes(cfg), rules, mesh_shape)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules) -> dict:
    """NamedSharding of every parameter, as a pure dict shaped like the params."""
    return named(mesh, param_specs(cfg, rules, dict(mesh.shape)))


def load_into(model: Transformer, params: Mapping, *, source: str = "params") -> None:
    """Load pure-dict `params` into an NNX `model`, first checking every name and shape."""
    state = nnx.state(model, nnx.Param)
    check_shapes({p: tuple(leaf.shape) for p, leaf in flatten(params).items()},
                 {p: tuple(leaf.shape) for p, leaf in flatten(nnx.to_pure_dict(state)).items()}, source)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
