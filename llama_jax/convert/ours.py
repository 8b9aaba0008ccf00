"""Our orbax checkpoints as a conversion source and target (layout: `llama_jax.convert.orbax_dirs`).

Reading restores one stacked parameter at a time (orbax partial restore), so a stacked [n_layers, ...]
group is the largest unit held. Writing saves each complete parameter as soon as its last layer
arrives (orbax partial saving), so again a stacked group is the most held.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from llama_jax.convert import orbax_dirs as checkpoint_io
from llama_jax.convert.common import ConvertError, check_dtype, copy_into, our_shape
from llama_jax.model import api
from llama_jax.model.config import ModelConfig
from llama_jax.model.lora import LoraConfig, adapted, adapter_shapes
from llama_jax.model.params import TensorMap
from llama_jax.utils.dtypes import config_name
from llama_jax.utils.files import tokenizer_files
from llama_jax.utils.trees import flatten, set_path


def is_orbax_dir(path: Path) -> bool:
    return checkpoint_io.is_params_dir(path) or checkpoint_io.is_run_dir(path)


class OrbaxReader:
    """A params directory or a run directory's latest step, checked against its stored config."""

    fmt = "orbax"

    def __init__(self, path: Path, base: ModelConfig | None = None):
        del base  # our checkpoints record the whole config; --preset is only checked against it
        self.path = path
        try:
            lora = checkpoint_io.read_lora(path)
        except (ValueError, FileNotFoundError) as e:
            raise ConvertError(str(e)) from None
        self._adapters = None
        if lora is not None:  # its checkpoints hold adapters: read the base and merge as tensors stream
            self._open_lora(path, *lora)
            return
        try:
            self.cfg = checkpoint_io.read_model_config(path)
            self.item = checkpoint_io.params_item_path(path)
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
            item = checkpoint_io.params_item_path(path)
            stored = checkpoint_io.stored_param_metadata(item)
            expected = {p: s.shape for p, s in flatten(adapter_shapes(self.cfg, lora)).items()}
            api.check_shapes({p: m.shape for p, m in stored.items()}, expected, str(item))
        except (ValueError, FileNotFoundError) as e:
            raise ConvertError(str(e)) from None
        self._adapters = flatten(checkpoint_io.restore_numpy(item, stored))  # small: rank × (in + out)
        self.tokenizer_files = tokenizer_files(path) or self._base.tokenizer_files
        self.source_dirs = (path, *self._base.source_dirs)

    def tensor(self, tmap: TensorMap, layer: int | None) -> np.ndarray:
        if self._adapters is not None:
            return self._merged(tmap, layer)
        if self._current is None or self._current[0] != tmap.ours:
            self._current = None  # drop the previous group before reading the next
            (value,) = flatten(checkpoint_io.restore_numpy(self.item, [tmap.ours])).values()
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


def _nest(path: tuple[str, ...], value) -> dict:
    tree = value
    for key in reversed(path):
        tree = {key: tree}
    return tree


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
    """Writes a params dir (model.yaml with param_dtype = the target dtype), one parameter at a time.

    Each complete parameter is saved at once with orbax's partial saving and dropped, so a stacked
    [n_layers, ...] group is the most held; orbax then merges the partial saves into one pytree, which
    becomes `params/` (restored like any StandardCheckpointer save). Parameters go to orbax as host-CPU
    jax arrays over the same buffer (no copy), which it writes without the staging copy it makes of
    numpy leaves.
    """

    PARTIAL_DIR = "partial_params"  # orbax's finalize skips pending saves of a dot-named directory
    PARTIAL_ITEM = "state"  # where orbax's partial saving puts the pytree inside its checkpoint

    def __init__(self, directory: Path, cfg: ModelConfig, dtype: np.dtype):
        super().__init__(cfg, dtype)
        self.directory = Path(directory).absolute()  # orbax refuses a relative destination (`--to orbax DST`)
        self._shard_axes = checkpoint_io.storage_shard_axes(cfg)

    def finished(self, path: tuple[str, ...], value: np.ndarray) -> None:
        import jax
        from orbax.checkpoint import v1 as ocp
        from orbax.checkpoint.experimental.v1 import partial

        array = jax.device_put(value, jax.devices("cpu")[0], may_alias=True)
        shard_axes = self._shard_axes[path]  # chunked along `embed`: hosts read only their fsdp slices
        storage = ocp.options.ArrayOptions.Saving.StorageOptions(shard_axes=shard_axes)
        with ocp.Context(array_options=ocp.options.ArrayOptions(saving=ocp.options.ArrayOptions.Saving(
                storage_options=storage))):
            partial.save(self.directory / self.PARTIAL_DIR, _nest(path, array))

    def finish(self) -> None:
        from orbax.checkpoint.experimental.v1 import partial

        partial.finalize(self.directory / self.PARTIAL_DIR)
        item = self.directory / self.PARTIAL_DIR / self.PARTIAL_ITEM
        if not item.is_dir():
            raise RuntimeError(f"{item}: orbax's partial save left no pytree there")
        os.rename(item, self.directory / checkpoint_io.PARAMS_DIR)
        shutil.rmtree(self.directory / self.PARTIAL_DIR)
        checkpoint_io.write_model_config(self.directory, self.cfg)
