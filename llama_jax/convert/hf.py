"""Hugging Face's format: `config.json` plus `model.safetensors` or index-sharded `model-*-of-*.safetensors`.

HF keeps q/k rows in the half-split rotary layout, which is ours, so tensors only need transposing
(`llama_jax.model.params`). A tied model (`tie_word_embeddings`) stores no `lm_head.weight`.
Shards are planned from the config before any tensor is read, so each one is streamed to disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llama_jax.model.config import ModelConfig
from llama_jax.convert import safetensors_io
from llama_jax.convert.common import ConvertError, contiguous, read_json_object
from llama_jax.utils.dtypes import config_name
from llama_jax.utils.files import tokenizer_files
from llama_jax.model.external_config import hf_config_dict, hf_config_fields
from llama_jax.model.params import TensorMap, from_torch_layout, tensor_maps, to_torch_layout, torch_name, torch_shape

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
NON_PARAMETER_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older transformers versions saved
DEFAULT_SHARD_BYTES = 5 * 2**30


def is_hf_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _weight_map(path: Path) -> dict[str, Path]:
    """{tensor name: file} from the index, or every tensor of the single model.safetensors."""
    if (path / INDEX_FILE).is_file():
        index = read_json_object(path / INDEX_FILE, "Hugging Face").get("weight_map")
        if not (isinstance(index, dict) and all(isinstance(name, str) and isinstance(file, str) and file
                                                and Path(file).name == file for name, file in index.items())):
            raise ConvertError(f"{path / INDEX_FILE}: weight_map must map tensor names to file names in "
                               f"this directory, got {json.dumps(index)[:80]}")
        files = {name: path / file for name, file in index.items()}
        for name, file in files.items():
            if not file.is_file():
                raise ConvertError(f"{file}: shard listed in {INDEX_FILE} for {name} is missing")
        return files
    if (path / SINGLE_FILE).is_file():
        return {name: path / SINGLE_FILE for name in safetensors_io.read_header(path / SINGLE_FILE)}
    raise ConvertError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights are read)")


class HFReader:
    """A Hugging Face LLaMA directory, validated (names, shapes, dtypes of every tensor) when opened."""

    fmt = "hf"

    def __init__(self, path: Path, base: ModelConfig):
        self.path = path
        config_path = path / CONFIG_FILE
        hf = read_json_object(config_path, "Hugging Face")
        try:
            self.cfg = base.replace(**hf_config_fields(hf))
        except (ValueError, KeyError, TypeError) as e:
            raise ConvertError(f"{config_path}: {e!r}") from None
        files = _weight_map(path)
        headers = {file: safetensors_io.read_header(file) for file in set(files.values())}
        self.entries = {}
        for name, file in files.items():
            if name not in headers[file]:
                raise ConvertError(f"{file}: tensor {name} (listed in {INDEX_FILE}) is not in the file")
            self.entries[name] = (file, headers[file][name])
        self._validate()
        embedding = self.entries[torch_name(tensor_maps(self.cfg)[0], "hf")]
        self.dtype = safetensors_io.tensor_dtype(embedding[0], "model.embed_tokens.weight", embedding[1])
        self.tokenizer_files = tokenizer_files(path)
        self.source_dirs = (path,)  # where the companion files are (`companions`)

    def _validate(self) -> None:
        expected = {}
        for tmap in tensor_maps(self.cfg):
            for layer in (range(self.cfg.n_layers) if tmap.per_layer else (None,)):
                expected[torch_name(tmap, "hf", layer)] = torch_shape(tmap, self.cfg)
        names = {n for n in self.entries if not n.endswith(NON_PARAMETER_SUFFIXES)}
        if self.cfg.tie_embeddings:  # some tied checkpoints still carry the (identical) head: ignored
            names.discard("lm_head.weight")
        if missing := sorted(set(expected) - names):
            raise ConvertError(f"{self.path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
        if unexpected := sorted(names - set(expected)):
            file = self.entries[unexpected[0]][0]
            raise ConvertError(f"{file}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
        for name, shape in expected.items():
            file, entry = self.entries[name]
            if tuple(entry["shape"]) != shape:
                raise ConvertError(f"{file}: {name} has shape {tuple(entry['shape'])}; {CONFIG_FILE} implies {shape}")
            safetensors_io.tensor_dtype(file, name, entry)

    def tensor(self, tmap: TensorMap, layer: int | None) -> np.ndarray:
        name = torch_name(tmap, "hf", layer)
        file, entry = self.entries[name]
        return from_torch_layout(safetensors_io.read_tensor(file, name, entry), tmap, self.cfg, "hf")

    def close(self) -> None:
        pass


def plan_shards(cfg: ModelConfig, dtype: np.dtype, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors of each output file, in conversion order, cut before a file would exceed the limit."""
    shards: list[list] = [[]]
    size = 0
    for tmap in tensor_maps(cfg):
        shape = torch_shape(tmap, cfg)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        for layer in (range(cfg.n_layers) if tmap.per_layer else (None,)):
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((torch_name(tmap, "hf", layer), shape))
            size += nbytes
    return shards


class HFWriter:
    """Writes config.json and safetensors files (sharded with an index above `max_shard_bytes`)."""

    def __init__(self, directory: Path, cfg: ModelConfig, dtype: np.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 token_ids: dict | None = None):
        self.directory, self.cfg, self.dtype = directory, cfg, np.dtype(dtype)
        self.token_ids = token_ids or {}  # config.json's bos/eos/pad ids (`llama_jax.convert.companions`)
        self.plan = plan_shards(cfg, self.dtype, max_shard_bytes)
        n = len(self.plan)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard = -1
        self._writer: safetensors_io.StreamingWriter | None = None

    def add(self, tmap: TensorMap, layer: int | None, value: np.ndarray) -> None:
        if self._writer is None or self._writer.complete:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            self._writer = safetensors_io.StreamingWriter(self.directory / self.files[self._shard],
                                                          self.plan[self._shard], self.dtype)
        w = to_torch_layout(value, tmap, self.cfg, "hf")
        self._writer.add(torch_name(tmap, "hf", layer), contiguous(w, self.dtype))

    def finish(self) -> None:
        self._writer.close()
        if self._shard != len(self.plan) - 1:
            raise RuntimeError(f"{self.directory}: wrote {self._shard + 1} of {len(self.plan)} planned files")
        config = hf_config_dict(self.cfg, self.token_ids)
        # transformers 5 reads `dtype`; older readers (and serving stacks) read `torch_dtype`
        config["dtype"] = config["torch_dtype"] = config_name(self.dtype)
        (self.directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if len(self.files) > 1:
            total = sum(int(np.prod(s)) for shard in self.plan for _, s in shard) * self.dtype.itemsize
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: file for file, shard in zip(self.files, self.plan) for name, _ in shard}}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
