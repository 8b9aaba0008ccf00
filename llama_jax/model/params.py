"""How our parameters correspond to Meta's and Hugging Face's tensors: one table, per-tensor transforms.

Ours: `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, matrices stored [in, out], per-layer tensors
stacked on a leading `layers` axis, rotary features in the half-split layout.
Meta (`consolidated.*.pth`): torch Linear layout [out, in], one tensor per layer, q/k rows in the
interleaved rotary layout (features 2i and 2i+1 of a head form a pair).
Hugging Face (`LlamaForCausalLM`): torch layout, q/k rows permuted to the half-split layout (feature i
pairs with i + head_dim/2), which is ours, so HF needs only transposes.

Every transform works on one tensor at a time, so converters can stream checkpoints of any size.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np

from llama_jax.model.config import ModelConfig, RopeScaling
from llama_jax.utils.config_io import json_type_problem
from llama_jax.utils.trees import set_path


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


def tensor_maps(cfg: ModelConfig, *, meta_embedding_split_dim: int = 1) -> list[TensorMap]:
    """The full table for `cfg`. Meta splits the embedding by columns in LLaMA 1/2, by rows in LLaMA 3."""
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


def hf_config_dict(cfg: ModelConfig, token_ids: Mapping = MappingProxyType({})) -> dict:
    """Hugging Face `config.json` contents for `cfg` (LlamaForCausalLM), with the `bos_token_id`,
    `eos_token_id` and `pad_token_id` of `token_ids` (those it has: they belong to the tokenizer and
    the checkpoint, not to the architecture)."""
    rope_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "initializer_range": cfg.init_std, **token_ids, "torch_dtype": "float32",
    }


# The JSON type of each config.json key we read (null where transformers writes it).
HF_CONFIG_TYPES = {
    "model_type": (str,), "vocab_size": (int,), "hidden_size": (int,), "num_hidden_layers": (int,),
    "num_attention_heads": (int,), "num_key_value_heads": (int, None), "intermediate_size": (int,),
    "head_dim": (int, None), "max_position_embeddings": (int,), "rms_norm_eps": (float,),
    "rope_theta": (float, None), "rope_scaling": (dict, None), "rope_parameters": (dict, None),
    "tie_word_embeddings": (bool,),
}
HF_ROPE_TYPES = {"rope_type": (str,), "type": (str,), "factor": (float,), "low_freq_factor": (float,),
                 "high_freq_factor": (float,), "original_max_position_embeddings": (int,), "rope_theta": (float,)}


def model_config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
    """Our ModelConfig from a Hugging Face LLaMA `config.json` mapping (plus field overrides); a value of
    the wrong type is a ValueError naming the key."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"config.json: expected a JSON object, got {type(hf).__name__}")
    problem = json_type_problem(dict(hf), HF_CONFIG_TYPES, "config.json")
    for key in ("rope_scaling", "rope_parameters"):
        problem = problem or (json_type_problem(hf[key], HF_ROPE_TYPES, f"config.json: {key}")
                              if isinstance(hf.get(key), dict) else None)
    if problem:
        raise ValueError(problem)
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json: model_type={hf.get('model_type')!r}, expected 'llama'")
    rope = hf.get("rope_scaling") or (hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else None)
    rope_theta = hf.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
    scaling = None
    if rope and rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    elif rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise ValueError(f"config.json: rope scaling type {rope.get('rope_type')!r} is not supported")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ValueError(f"config.json: head_dim={head_dim} × heads != hidden_size={hf['hidden_size']}")
    fields = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_hidden_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta), rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)
