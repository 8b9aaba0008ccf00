"""How our parameters correspond to Meta's and Hugging Face's tensors: one table, per-tensor transforms.

Ours: `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, matrices stored [in, out], per-layer tensors
stacked on a leading `layers` axis, rotary features in the half-split layout.
Meta (`consolidated.*.pth`): torch Linear layout [out, in], one tensor per layer, q/k rows in the
interleaved rotary layout (features 2i and 2i+1 of a head form a pair).
Hugging Face (`LlamaForCausalLM`): torch layout, q/k rows permuted to the half-split layout (feature i
pairs with i + head_dim/2), which is ours, so HF needs only transposes.

Every transform works on one tensor at a time, so converters can stream checkpoints of any size.
The formats' config files (config.json, params.json) are `llama_jax.model.external_config`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from llama_jax.model import api
from llama_jax.model.config import ModelConfig
from llama_jax.utils.trees import set_path

LLAMA3_VOCAB_SIZE = 128256  # LLaMA 3's tokenizer; its releases split the embedding by rows


@dataclass(frozen=True)
class TensorMap:
    """One parameter: its path in our tree and its names and layout in the PyTorch formats."""

    ours: tuple[str, ...]
    hf: str  # `{i}` stands for the layer index
    meta: str
    transposed: bool  # ours is [in, out]; torch Linear is [out, in]
    rotary: str | None = None  # "q" or "k": rows need the rotary permutation between Meta and ours
    meta_split_dim: int | None = None  # axis along which Meta's model-parallel shards split it (torch layout)

    @property
    def per_layer(self) -> bool:
        return self.ours[0] == "layers"


def embedding_split_dim_for(cfg: ModelConfig) -> int:
    """Meta's embedding split: by rows (dim 0) for LLaMA 3's vocabulary, by columns (dim 1) before."""
    return 0 if cfg.vocab_size == LLAMA3_VOCAB_SIZE else 1


def tensor_maps(cfg: ModelConfig, *, meta_embedding_split_dim: int | None = None) -> list[TensorMap]:
    """The full table for `cfg`. Meta splits the embedding by columns in LLaMA 1/2, by rows in LLaMA 3
    (`embedding_split_dim_for`, unless a checkpoint's own split is given)."""
    if meta_embedding_split_dim is None:
        meta_embedding_split_dim = embedding_split_dim_for(cfg)
    maps = [
        TensorMap(("tok_embeddings",), "model.embed_tokens.weight", "tok_embeddings.weight", False,
                  meta_split_dim=meta_embedding_split_dim),
        TensorMap(("layers", "attention", "wq", "kernel"), "model.layers.{i}.self_attn.q_proj.weight",
                  "layers.{i}.attention.wq.weight", True, rotary="q", meta_split_dim=0),
        TensorMap(("layers", "attention", "wk", "kernel"), "model.layers.{i}.self_attn.k_proj.weight",
                  "layers.{i}.attention.wk.weight", True, rotary="k", meta_split_dim=0),
        TensorMap(("layers", "attention", "wv", "kernel"), "model.layers.{i}.self_attn.v_proj.weight",
                  "layers.{i}.attention.wv.weight", True, meta_split_dim=0),
        TensorMap(("layers", "attention", "wo", "kernel"), "model.layers.{i}.self_attn.o_proj.weight",
                  "layers.{i}.attention.wo.weight", True, meta_split_dim=1),
        TensorMap(("layers", "feed_forward", "w1", "kernel"), "model.layers.{i}.mlp.gate_proj.weight",
                  "layers.{i}.feed_forward.w1.weight", True, meta_split_dim=0),
        TensorMap(("layers", "feed_forward", "w3", "kernel"), "model.layers.{i}.mlp.up_proj.weight",
                  "layers.{i}.feed_forward.w3.weight", True, meta_split_dim=0),
        TensorMap(("layers", "feed_forward", "w2", "kernel"), "model.layers.{i}.mlp.down_proj.weight",
                  "layers.{i}.feed_forward.w2.weight", True, meta_split_dim=1),
        TensorMap(("layers", "attention_norm", "scale"), "model.layers.{i}.input_layernorm.weight",
                  "layers.{i}.attention_norm.weight", False),
        TensorMap(("layers", "ffn_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight",
                  "layers.{i}.ffn_norm.weight", False),
        TensorMap(("norm", "scale"), "model.norm.weight", "norm.weight", False),
    ]
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("output", "kernel"), "lm_head.weight", "output.weight", True, meta_split_dim=0))
    return maps


def our_shape(tmap: TensorMap, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of the full parameter in our tree (stacked over layers, [in, out] for matrices). A tied
    model's export writes an explicit output matrix: its shape is the untied model's."""
    return api.flat_param_shapes(cfg.replace(tie_embeddings=False))[tmap.ours]


def torch_shape(tmap: TensorMap, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of one (per-layer) tensor in torch layout ([out, in] for matrices), as Meta and HF store it."""
    shape = our_shape(tmap, cfg)[1 if tmap.per_layer else 0:]
    return shape[::-1] if tmap.transposed else shape


def _rotary_heads(tmap: TensorMap, cfg: ModelConfig) -> int:
    return cfg.n_heads if tmap.rotary == "q" else cfg.kv_heads


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute rows [n_heads·head_dim, in] from Meta's pair-adjacent rotary layout to the half-split one."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def half_split_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_half_split`."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def to_torch_layout(ours: np.ndarray, tmap: TensorMap, cfg: ModelConfig, fmt: str) -> np.ndarray:
    """One (per-layer) tensor of ours in `fmt` ("hf" or "meta") layout."""
    w = ours.T if tmap.transposed else ours
    if fmt == "meta" and tmap.rotary:
        w = half_split_to_interleaved(w, _rotary_heads(tmap, cfg))
    return w


def from_torch_layout(w: np.ndarray, tmap: TensorMap, cfg: ModelConfig, fmt: str) -> np.ndarray:
    """One (per-layer) tensor in `fmt` ("hf" or "meta") layout as ours."""
    if fmt == "meta" and tmap.rotary:
        w = interleaved_to_half_split(w, _rotary_heads(tmap, cfg))
    return w.T if tmap.transposed else w


def torch_name(tmap: TensorMap, fmt: str, layer: int | None = None) -> str:
    template = tmap.hf if fmt == "hf" else tmap.meta
    return template.format(i=layer) if tmap.per_layer else template


def params_from_torch(get: Callable[[str], np.ndarray], cfg: ModelConfig, fmt: str) -> dict:
    """Our pure-dict params from a tensor getter by name in `fmt` layout (raises KeyError on a missing name)."""
    params: dict = {}
    for tmap in tensor_maps(cfg):
        if tmap.per_layer:
            value = np.stack([from_torch_layout(np.asarray(get(torch_name(tmap, fmt, i))), tmap, cfg, fmt)
                              for i in range(cfg.n_layers)])
        else:
            value = from_torch_layout(np.asarray(get(torch_name(tmap, fmt))), tmap, cfg, fmt)
        set_path(params, tmap.ours, value)
    return params
