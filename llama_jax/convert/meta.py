"""Meta's release format: `params.json` and model-parallel shards `consolidated.NN.pth`.

Each shard holds every tensor; the ones Meta splits for model parallelism are cut along the dimension
`llama_jax.model.params.TensorMap.meta_split_dim` gives (q/k/v, w1/w3 and output by rows, wo and w2 by
columns, the embedding by columns in LLaMA 1/2 and by rows in LLaMA 3), norms are replicated; params.json
maps to a ModelConfig in `llama_jax.model.external_config`.
Reading memory-maps every shard (`torch.load(mmap=True, weights_only=True)`, which also refuses to
unpickle anything but tensors) and concatenates one tensor at a time; the maps are reopened after every
`RELEASE_BYTES` read so the resident set does not grow to the size of the checkpoint.
Writing streams each piece into its shard file as it arrives (`torch_stream`), holding one tensor.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from llama_jax.model.config import ModelConfig
from llama_jax.convert.common import ConvertError, contiguous, read_json_object, tensor_items, torch_to_numpy
from llama_jax.convert.torch_stream import StreamingTorchSave
from llama_jax.model.external_config import meta_params_dict, meta_params_fields
from llama_jax.model.params import TensorMap, from_torch_layout, tensor_maps, to_torch_layout, torch_name, torch_shape
from llama_jax.utils.files import tokenizer_files

PARAMS_FILE = "params.json"
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth$")
NON_PARAMETERS = ("rope.freqs",)  # precomputed rotary table some releases include
RELEASE_BYTES = 64 * 2**20


def is_meta_dir(path: Path) -> bool:
    return (path / PARAMS_FILE).is_file() and any(SHARD_PATTERN.match(p.name) for p in path.iterdir())


def shard_name(index: int) -> str:
    return f"consolidated.{index:02d}.pth"


def list_shards(path: Path) -> list[Path]:
    """The shard files in order, checking none is missing from 00 to the highest index."""
    found = {int(m.group(1)): p for p in path.iterdir() if (m := SHARD_PATTERN.match(p.name))}
    if not found:
        raise ConvertError(f"{path}: no consolidated.NN.pth shard")
    for i in range(max(found) + 1):
        if i not in found:
            raise ConvertError(f"{path / shard_name(i)}: shard {i} of {max(found) + 1} is missing")
    return [found[i] for i in range(len(found))]


class _Shards:
    """Memory-mapped shards, loaded on first use and released after every RELEASE_BYTES read."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._loaded: list[dict | None] = [None] * len(paths)
        self._read = 0

    def state(self, index: int) -> dict:
        if self._loaded[index] is None:
            self._loaded[index] = load_shard(self.paths[index])
        return self._loaded[index]

    def tensor(self, index: int, name: str):
        tensor = self.state(index)[name]
        self._read += tensor.nbytes
        return tensor

    def release_if_due(self) -> None:
        if self._read >= RELEASE_BYTES:
            self._loaded = [None] * len(self.paths)
            self._read = 0


def load_shard(path: Path) -> dict:
    """torch.load a shard memory-mapped, allowing nothing but tensors and plain containers."""
    import pickle

    import torch

    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise ConvertError(f"{path}: refusing to unpickle it: it holds objects other than tensors "
                           f"(torch.load weights_only=True: {str(e).splitlines()[0]})") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ConvertError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise ConvertError(f"{path}: key {key!r} is a {type(key).__name__}, not a tensor name")
        if not isinstance(value, torch.Tensor):
            raise ConvertError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_quantized:
            raise ConvertError(f"{path}: {key} is a {'quantized' if value.is_quantized else value.layout} tensor; "
                               f"expected a dense one")
    return state


def _check_torch_dtype(tensor, where: str) -> None:
    import torch

    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConvertError(f"{where}: unsupported dtype {tensor.dtype}; expected float32, bfloat16 or float16")


class MetaReader:
    """A Meta checkpoint directory, validated (keys, shapes, dtypes in every shard) when opened."""

    fmt = "meta"

    def __init__(self, path: Path, base: ModelConfig):
        self.path = path
        params_path = path / PARAMS_FILE
        params = read_json_object(params_path, "Meta")
        self.shards = _Shards(list_shards(path))
        first = self.shards.state(0)
        try:
            fields = meta_params_fields(params, params_path)
        except ValueError as e:
            raise ConvertError(str(e)) from None
        n = len(self.shards.paths)
        if "tok_embeddings.weight" not in first:
            raise ConvertError(f"{self.shards.paths[0]}: missing key 'tok_embeddings.weight'")
        emb_shape = tuple(first["tok_embeddings.weight"].shape)
        self.embedding_split_dim = 1 if n > 1 and emb_shape[1] * n == fields["dim"] else 0
        if fields["vocab_size"] == -1:
            fields["vocab_size"] = emb_shape[0] * (n if self.embedding_split_dim == 0 else 1)
        try:
            self.cfg = base.replace(**fields)
        except (ValueError, TypeError) as e:
            raise ConvertError(f"{params_path}: {e}") from None
        self.maps = {m.ours: m for m in tensor_maps(self.cfg, meta_embedding_split_dim=self.embedding_split_dim)}
        self._validate()
        self.dtype = torch_to_numpy(first["tok_embeddings.weight"][:0]).dtype
        self.tokenizer_files = tokenizer_files(path)
        self.source_dirs = (path,)  # where the companion files are (`companions`)

    def _validate(self) -> None:
        n = len(self.shards.paths)
        first_dtype = self.shards.state(0)["tok_embeddings.weight"].dtype
        expected = {}
        for tmap in self.maps.values():
            shape = list(torch_shape(tmap, self.cfg))
            if tmap.meta_split_dim is not None:
                if shape[tmap.meta_split_dim] % n:
                    raise ConvertError(f"{self.path}: {n} shards cannot split {tmap.meta.format(i=0)} of shape "
                                       f"{tuple(shape)} along dim {tmap.meta_split_dim}")
                shape[tmap.meta_split_dim] //= n
            for layer in (range(self.cfg.n_layers) if tmap.per_layer else (None,)):
                expected[torch_name(tmap, "meta", layer)] = tuple(shape)
        for index, path in enumerate(self.shards.paths):
            state = self.shards.state(index)
            names = set(state) - set(NON_PARAMETERS)
            if missing := sorted(set(expected) - names):
                raise ConvertError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")
            if unexpected := sorted(names - set(expected)):
                raise ConvertError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all)")
            for name, shape in expected.items():
                got = tuple(state[name].shape)
                if got != shape:
                    raise ConvertError(f"{path}: {name} has shape {got}; params.json with {n} shard(s) "
                                       f"implies {shape}")
                _check_torch_dtype(state[name], f"{path}: {name}")
                if state[name].dtype != first_dtype:  # a mixed file would be cast silently to the first's dtype
                    raise ConvertError(f"{path}: {name} is {state[name].dtype} but tok_embeddings.weight is "
                                       f"{first_dtype}: every tensor of a Meta checkpoint has one dtype")

    def tensor(self, tmap: TensorMap, layer: int | None) -> np.ndarray:
        tmap = self.maps[tmap.ours]
        name = torch_name(tmap, "meta", layer)
        pieces = [torch_to_numpy(self.shards.tensor(i, name)) for i in range(len(self.shards.paths))]
        if tmap.meta_split_dim is None:
            for i, piece in enumerate(pieces[1:], 1):
                if not np.array_equal(piece.view(np.uint8), pieces[0].view(np.uint8)):
                    raise ConvertError(f"{self.shards.paths[i]}: replicated tensor {name} differs from "
                                       f"{self.shards.paths[0].name}'s")
            whole = pieces[0]
        elif len(pieces) == 1:
            whole = pieces[0]  # a view of the map: the writer copies what it needs
        else:
            whole = np.concatenate(pieces, axis=tmap.meta_split_dim)
        del pieces
        self.shards.release_if_due()
        return from_torch_layout(whole, tmap, self.cfg, "meta")

    def close(self) -> None:
        self.shards = None


class MetaWriter:
    """Writes params.json and `model_parallel` shards, streaming every piece straight into its shard file.

    Splits that do not divide evenly are refused before anything is written. A tied model gets an
    explicit `output.weight` (a copy of the embedding, written last), because Meta's loaders always
    expect one; reading it back gives an untied model with identical weights.
    """

    def __init__(self, directory: Path, cfg: ModelConfig, dtype: np.dtype, model_parallel: int = 1,
                 embedding_split_dim: int | None = None):
        if model_parallel < 1:
            raise ConvertError(f"--model-parallel must be >= 1, got {model_parallel}")
        self.directory, self.cfg, self.dtype, self.n = directory, cfg, np.dtype(dtype), model_parallel
        untied = cfg.replace(tie_embeddings=False)
        self.maps = {m.ours: m for m in tensor_maps(untied, meta_embedding_split_dim=embedding_split_dim)}
        try:
            self.params = meta_params_dict(cfg)
        except ValueError as e:
            raise ConvertError(str(e)) from None
        self.plan = []
        for tmap, layer in tensor_items(untied):
            tmap = self.maps[tmap.ours]
            shape = list(torch_shape(tmap, cfg))
            if tmap.meta_split_dim is not None:
                if shape[tmap.meta_split_dim] % model_parallel:
                    raise ConvertError(f"--model-parallel {model_parallel} does not divide {torch_name(tmap, 'meta', layer)}: "
                                       f"size {shape[tmap.meta_split_dim]} along dim {tmap.meta_split_dim}")
                shape[tmap.meta_split_dim] //= model_parallel
            self.plan.append((torch_name(tmap, "meta", layer), tuple(shape)))
        self._files: list[StreamingTorchSave] = []
        self._tied_output: np.ndarray | None = None

    def add(self, tmap: TensorMap, layer: int | None, value: np.ndarray) -> None:
        if not self._files:
            self._files = [StreamingTorchSave(self.directory / shard_name(i), self.plan, self.dtype)
                           for i in range(self.n)]
        tmap = self.maps[tmap.ours]
        w = to_torch_layout(value, tmap, self.cfg, "meta")
        pieces = [w] * self.n if tmap.meta_split_dim is None else np.split(w, self.n, axis=tmap.meta_split_dim)
        for file, piece in zip(self._files, pieces):
            file.add(torch_name(tmap, "meta", layer), contiguous(piece, self.dtype))
        if self.cfg.tie_embeddings and tmap.ours == ("tok_embeddings",):
            self._tied_output = np.array(value.T)

    def finish(self) -> None:
        if self._tied_output is not None:
            self.add(self.maps[("output", "kernel")], None, self._tied_output)
            self._tied_output = None
        for file in self._files:
            file.close()
        (self.directory / PARAMS_FILE).write_text(json.dumps(self.params, indent=2) + "\n")
