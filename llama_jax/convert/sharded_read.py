"""Any checkpoint read straight into target shardings: each process holds only what its devices hold.

Reading a whole checkpoint into host memory and then placing it (`read_checkpoint` → numpy →
`make_array_from_callback`) needs the whole model in RAM on every host: ~140 GB for LLaMA-2-70B.
Here each parameter group is built directly in this process's device shards: for every (per-layer)
tensor the format's reader yields, only the slices this process's devices hold are copied into their
shard buffers, the tensor is dropped, and once a group is complete each buffer goes to its device. A
process's peak is therefore its own share of the model plus one checkpoint tensor plus one device shard.
Our own checkpoints are read the same way, one parameter at a time and one device shard at a time, once
verified (`llama_jax.checkpoint.params.load_params`): each host reads only the stored chunks its shards
overlap, which for a params dir (chunked along `embed`) or a checkpoint written with the same fsdp split
is its own slices.

Meta and Hugging Face readers still read each tensor whole (memory-mapped shards for Meta; Meta's q/k
rows must be permuted whole), so every process reads every byte once: host memory, not I/O, is what
this bounds.
"""
from __future__ import annotations

import collections
import os

import jax
import numpy as np

from llama_jax.checkpoint import layout, params as checkpoint_params
from llama_jax.convert.common import copy_into
from llama_jax.convert.pipeline import detect_format, open_reader
from llama_jax.model import api
from llama_jax.model.config import ModelConfig
from llama_jax.model.params import our_shape, tensor_maps
from llama_jax.utils.dtypes import config_name
from llama_jax.utils.trees import flatten, unflatten


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _place_group(reader, tmap, cfg: ModelConfig, sharding, dtype: np.dtype) -> jax.Array:
    """One parameter (stacked over layers when per-layer) built in this process's shards of `sharding`."""
    shape = our_shape(tmap, cfg)
    by_device = {device: _bounds(index, shape)
                 for device, index in sharding.addressable_devices_indices_map(shape).items()}
    buffers = {b: np.empty(tuple(stop - start for start, stop in b), dtype) for b in set(by_device.values())}
    for layer in (range(cfg.n_layers) if tmap.per_layer else (None,)):
        value = reader.tensor(tmap, layer)
        for bounds, buffer in buffers.items():
            if layer is None:
                copy_into(buffer, value[tuple(slice(*b) for b in bounds)])
            elif bounds[0][0] <= layer < bounds[0][1]:
                copy_into(buffer[layer - bounds[0][0]], value[tuple(slice(*b) for b in bounds[1:])])
        del value
    remaining = collections.Counter(by_device.values())
    arrays = []
    for device, bounds in by_device.items():
        arrays.append(jax.device_put(buffers[bounds], device).block_until_ready())
        remaining[bounds] -= 1
        if not remaining[bounds]:
            del buffers[bounds]  # its devices hold it now
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def read_sharded(path: str | os.PathLike, shardings_for, *, expected: ModelConfig | None = None,
                 fmt: str | None = None, dtype: str | None = None) -> tuple[ModelConfig, dict, str | None]:
    """(config, params as jax arrays, tokenizer path or None) of the checkpoint at `path`, in any format.

    `shardings_for(cfg)` gives the target shardings (a pure dict like the params) for the checkpoint's
    config, after `dtype` (a config dtype name: compute and stored weights) is applied. With
    `expected`, the checkpoint's parameter names and shapes must be that config's (the error names the
    checkpoint and the first parameter that differs) and the weights are stored in its param_dtype.
    """
    fmt = fmt or detect_format(path)
    if fmt == "orbax":
        cfg = layout.read_model_config(path) if expected is None else expected
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype) if dtype else cfg
        params = checkpoint_params.load_params(path, cfg, shardings=shardings_for(cfg))
        return cfg, params, layout.find_tokenizer(path)
    reader = open_reader(path, fmt)
    try:
        if expected is not None:
            api.check_param_shapes(api.flat_param_shapes(reader.cfg), expected, str(path))
        cfg = expected if expected is not None else reader.cfg.replace(param_dtype=config_name(reader.dtype))
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype) if dtype else cfg
        shardings = flatten(shardings_for(cfg))
        params = {tmap.ours: _place_group(reader, tmap, cfg, shardings[tmap.ours], np.dtype(cfg.weight_dtype))
                  for tmap in tensor_maps(cfg)}
    finally:
        reader.close()
    tokenizer = str(reader.tokenizer_files[0]) if reader.tokenizer_files else None
    return cfg, unflatten(params), tokenizer
