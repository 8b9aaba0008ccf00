"""A checkpoint of any supported format, placed on the device mesh for evaluation.

Run directories, params-only orbax directories and Meta or Hugging Face directories are read straight
into their shards on a ("data", "fsdp", "tensor") mesh over every device of every process, with the
project's sharding rules (`load_eval_model`, through `llama_jax.convert.sharded_read`): each process
builds and holds only the shards its own devices hold, so the same code runs on one CPU and across
hosts without any host holding the whole model. `place_model` places weights already in memory.
Evaluation batches are replicated inputs split by rows over the batch axes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.model import api
from llama_jax.model.attention import resolve_attention
from llama_jax.model.config import ModelConfig
from llama_jax.parallel.logical import Rules
from llama_jax.parallel.mesh import MeshConfig, activate, batch_sharding, make_mesh, replicated
from llama_jax.parallel.platform import platform_of
from llama_jax.parallel.rules import axis_product, rules_for
from llama_jax.utils import dtypes
from llama_jax.utils.trees import flatten

EVAL_DTYPES = ("bfloat16", "float32")  # evaluation computes in these (any spelling of utils.dtypes)


@dataclass(frozen=True)
class EvalModel:
    """Config, weights (pure dict of arrays), tokenizer and, when sharded, the mesh and rules. Every
    evaluation program is built from it, so its config's attention implementation is resolved here, once,
    for the mesh's platform and sequences up to max_seq_len (`model.attention.resolve_attention`)."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any = None
    mesh: Mesh | None = None
    rules: Rules = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "cfg", resolve_attention(self.cfg, platform_of(self.mesh), training=False))

    @property
    def row_multiple(self) -> int:
        """Batches must have a multiple of this many rows (the devices the rows are split over)."""
        if self.mesh is None:
            return 1
        return axis_product(dict(self.mesh.shape), batch_sharding(self.mesh, self.rules).spec[0])

    def place_rows(self, array: np.ndarray) -> jax.Array:
        """A host array holding the whole batch (identical on every process), split by rows."""
        if self.mesh is None:
            return jax.device_put(array)
        return _from_host(array, batch_sharding(self.mesh, self.rules))

    def out_sharding(self):
        """Results come back whole on every process (small: per-token scores or generated ids)."""
        return None if self.mesh is None else replicated(self.mesh)

    def activate(self):
        """Mesh and rules in context while tracing, so the model's sharding constraints apply."""
        return contextlib.nullcontext() if self.mesh is None else activate(self.mesh, self.rules)


def _from_host(array: np.ndarray, sharding) -> jax.Array:
    """Each process builds only its addressable shards from the full host array."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def compute_dtype(name: str) -> str:
    """The canonical name of an evaluation dtype (bfloat16 | float32, or their aliases bf16 | fp32)."""
    return dtypes.canonical(name, "dtype", EVAL_DTYPES)


def place_model(cfg: ModelConfig, params: Any, *, dtype: str = "float32", tokenizer=None,
                mesh_cfg=None) -> EvalModel:
    """Put numpy `params` on a mesh over all devices (or the one default device when `mesh_cfg` is None).

    `dtype` sets both the compute dtype and the stored weight dtype: bf16 evaluation keeps bf16
    weights, halving memory and sparing a conversion on every matmul.
    """
    name = compute_dtype(dtype)
    cfg = cfg.replace(dtype=name, param_dtype=name)
    api.check_param_shapes({path: tuple(np.shape(x)) for path, x in flatten(params).items()}, cfg, "checkpoint")
    cast = jax.tree.map(lambda x: np.asarray(x).astype(cfg.weight_dtype, copy=False), params)
    if mesh_cfg is None:
        return EvalModel(cfg, jax.device_put(cast), tokenizer)
    mesh = make_mesh(mesh_cfg)
    rules = rules_for(mesh_cfg.strategy)
    placed = jax.tree.map(_from_host, cast, api.param_shardings(cfg, mesh, rules))
    return EvalModel(cfg, placed, tokenizer, mesh, rules)


def load_eval_model(path: str, *, dtype: str = "bfloat16", mesh_cfg=None, tokenizer_path: str | None = None,
                    fmt: str | None = None) -> EvalModel:
    """Any checkpoint (format auto-detected unless `fmt`), its tokenizer, on a mesh of all devices.

    The weights go straight into their shards, one parameter group at a time: each process holds only
    what its own devices hold (`llama_jax.convert.sharded_read`), never the whole model. The tokenizer
    is `tokenizer_path` when given, else the one that comes with the checkpoint; its vocabulary must
    match the model's.
    """
    from llama_jax.convert.sharded_read import read_sharded
    from llama_jax.data.tokenizer import check_vocab_size, load_tokenizer

    name = compute_dtype(dtype)  # a bad name fails before the checkpoint is read
    mesh_cfg = mesh_cfg or MeshConfig()
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg.strategy)
    cfg, params, found_tokenizer = read_sharded(path, lambda cfg: api.param_shardings(cfg, mesh, rules), fmt=fmt,
                                                dtype=name)
    tokenizer_path = tokenizer_path or found_tokenizer
    if tokenizer_path is None:
        raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json comes with this checkpoint; "
                                f"pass --tokenizer PATH")
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab_size(tokenizer, cfg.vocab_size)
    return EvalModel(cfg, params, tokenizer, mesh, rules)
