"""Our checkpoints as a conversion source and target (layout and I/O: `llama_jax.checkpoint`).

Reading restores one stacked parameter at a time (orbax partial restore), so a stacked [n_layers, ...]
group is the largest unit held. Writing saves each complete parameter as soon as its last layer
arrives (`checkpoint.params.ParamsDirWriter`), so again a stacked group is the most held.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_jax.checkpoint import layout, params as checkpoint_io
from llama_jax.checkpoint.integrity import CheckpointDamaged
from llama_jax.convert.common import ConvertError, check_dtype, copy_into
from llama_jax.model import api
from llama_jax.model.config import ModelConfig
from llama_jax.model.lora import LoraConfig, adapted, adapter_shapes
from llama_jax.model.params import TensorMap, our_shape
from llama_jax.utils.dtypes import config_name
from llama_jax.utils.files import tokenizer_files
from llama_jax.utils.trees import flatten, set_path


def is_orbax_dir(path: Path) -> bool:
    return layout.is_params_dir(path) or layout.is_run_dir(path)


class OrbaxReader:
    """A params directory or a run directory's latest step, checked against its stored config."""

    fmt = "orbax"

    def __init__(self, path: Path, base: ModelConfig | None = None):
        del base  # our checkpoints record the whole config; --preset is only checked against it
        self.path = path
        try:
            lora = layout.read_lora(path)
        except (ValueError, FileNotFoundError) as e:
            raise ConvertError(str(e)) from None
        self._adapters = None
        if lora is not None:  # its checkpoints hold adapters: read the base and merge as tensors stream
            self._open_lora(path, *lora)
            return
        try:
            self.cfg = layout.read_model_config(path)
            self.item = checkpoint_io.verified_params_item(path)
            stored = checkpoint_io.stored_param_metadata(self.item)
            api.check_param_shapes({p: m.shape for p, m in stored.items()}, self.cfg, str(self.item))
        except (ValueError, FileNotFoundError) as e:
            raise ConvertError(str(e)) from None
        for p, meta in stored.items():
            check_dtype(meta.dtype, f"{self.item}: {'.'.join(p)}")
        self.dtype = np.dtype(stored[("tok_embeddings",)].dtype)
        self.tokenizer_files = tokenizer_files(path)
        self.source_dirs = (path,)  # where the companion files are (`companions`)
        self._current: tuple[tuple[str, ...], np.ndarray] | None = None

    def _open_lora(self, path: Path, lora: LoraConfig, base_path: Path) -> None:
        self._base = OrbaxReader(base_path)
        self.cfg, self.dtype, self._lora = self._base.cfg, self._base.dtype, lora
        try:
            item = checkpoint_io.verified_params_item(path)
            stored = checkpoint_io.stored_param_metadata(item)
            expected = {p: s.shape for p, s in flatten(adapter_shapes(self.cfg, lora)).items()}
            api.check_shapes({p: m.shape for p, m in stored.items()}, expected, str(item))
        except (ValueError, FileNotFoundError) as e:
            raise ConvertError(str(e)) from None
        self._adapters = flatten(checkpoint_io.restore_checked(item, stored))  # small: rank × (in + out)
        self.tokenizer_files = tokenizer_files(path) or self._base.tokenizer_files
        self.source_dirs = (path, *self._base.source_dirs)

    def tensor(self, tmap: TensorMap, layer: int | None) -> np.ndarray:
        if self._adapters is not None:
            return self._merged(tmap, layer)
        if self._current is None or self._current[0] != tmap.ours:
            self._current = None  # drop the previous group before reading the next
            try:
                (value,) = flatten(checkpoint_io.restore_checked(self.item, [tmap.ours])).values()
            except CheckpointDamaged as e:
                raise ConvertError(str(e)) from None
            self._current = (tmap.ours, value)
        value = self._current[1]
        return value if layer is None else value[layer]

    def _merged(self, tmap: TensorMap, layer: int | None) -> np.ndarray:
        """The base tensor plus scale · A B where the run adapted it (the rule of `llama_jax.model.lora`)."""
        value = self._base.tensor(tmap, layer)
        a = self._adapters.get(tmap.ours[:-1] + ("a",))
        if a is None:
            return value
        b = self._adapters[tmap.ours[:-1] + ("b",)]
        if layer is not None:
            a, b = a[layer], b[layer]
        return adapted(value, a, b, self._lora.scale, xp=np).astype(value.dtype)

    def close(self) -> None:
        self._current = None
        if self._adapters is not None:
            self._base.close()


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose buffer starts on an `alignment`-byte boundary.

    XLA's CPU client adopts such a buffer without copying (`jax.device_put(..., may_alias=True)`);
    numpy's own allocations are only 16-byte aligned, which forces a copy.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class ParamTreeBuilder:
    """Our pure-dict params (numpy, one dtype) assembled from per-layer tensors in conversion order.

    A stacked parameter is filled layer by layer and handed to `finished` once complete.
    """

    def __init__(self, cfg: ModelConfig, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.cfg = cfg.replace(param_dtype=config_name(self.dtype))
        self.params: dict = {}
        self._filling: dict[tuple[str, ...], np.ndarray] = {}

    def add(self, tmap: TensorMap, layer: int | None, value: np.ndarray) -> None:
        if tmap.ours not in self._filling:
            self._filling[tmap.ours] = aligned_empty(our_shape(tmap, self.cfg), self.dtype)
        target = self._filling[tmap.ours]
        copy_into(target if layer is None else target[layer], value)
        if layer is None or layer == self.cfg.n_layers - 1:
            self.finished(tmap.ours, self._filling.pop(tmap.ours))

    def finished(self, path: tuple[str, ...], value: np.ndarray) -> None:
        set_path(self.params, path, value)


class OrbaxWriter(ParamTreeBuilder):
    """Writes a params dir (model.yaml with param_dtype = the target dtype), one parameter at a time:
    each complete parameter goes to `ParamsDirWriter` at once and is dropped, so a stacked
    [n_layers, ...] group is the most held."""

    def __init__(self, directory: Path, cfg: ModelConfig, dtype: np.dtype):
        super().__init__(cfg, dtype)
        self._writer = checkpoint_io.ParamsDirWriter(directory, self.cfg)

    def finished(self, path: tuple[str, ...], value: np.ndarray) -> None:
        self._writer.add(path, value)

    def finish(self) -> None:
        self._writer.finish()
