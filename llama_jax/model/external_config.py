"""A ModelConfig as the other formats write it: Hugging Face's `config.json` and Meta's `params.json`.

Each format records the architecture only; what it leaves out (compute dtype, attention kernel, the
context length of Meta's releases) comes from a base config the caller chooses. Reading is strict (a
value of the wrong JSON type is an error naming the key); writing refuses a config the format cannot
express rather than writing one that reads back as another model. The special-token ids a config.json
carries belong to the tokenizer and are passed in (`llama_jax.convert.companions` reads them).
"""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from llama_jax.model.config import ModelConfig, RopeScaling
from llama_jax.utils.config_io import json_type_problem

# --- Hugging Face config.json (LlamaForCausalLM) ---

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


def hf_config_fields(hf: Mapping) -> dict:
    """The ModelConfig fields a Hugging Face LLaMA `config.json` mapping sets (n_kv_heads None for plain
    multi-head attention, as our presets say it); a value of the wrong type is a ValueError naming the key."""
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
    n_kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=None if n_kv_heads == hf["num_attention_heads"] else n_kv_heads,
        ffn_hidden_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta), rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


# --- Meta params.json ---

# params.json keys that set the model, and runtime-only keys Meta's loaders accept and we ignore.
META_PARAMS_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                    "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len")
META_RUNTIME_KEYS = ("max_batch_size",)
# The type each params.json key must have (null where Meta writes it).
META_PARAMS_TYPES = {"dim": (int,), "n_layers": (int,), "n_heads": (int,), "vocab_size": (int,),
                     "multiple_of": (int,), "max_seq_len": (int,), "n_kv_heads": (int, None),
                     "ffn_dim_multiplier": (float, None), "norm_eps": (float,), "rope_theta": (float,),
                     "rope_scaling_factor": (float,), "use_scaled_rope": (bool,)}
# Meta's `use_scaled_rope` applies LLaMA 3.1's fixed constants; only the factor can be given.
META_ROPE_SCALING = RopeScaling()


def meta_params_fields(params: Mapping, source: str | Path) -> dict:
    """ModelConfig fields from a params.json mapping (vocab_size may be -1: the caller fills it in from
    the embedding's shape); a problem is a ValueError naming `source` and the key."""
    unknown = sorted(set(params) - set(META_PARAMS_KEYS) - set(META_RUNTIME_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(META_PARAMS_KEYS)})")
    for key in ("dim", "n_layers", "n_heads", "vocab_size"):
        if key not in params:
            raise ValueError(f"{source}: missing key {key!r}")
    if problem := json_type_problem(dict(params), META_PARAMS_TYPES, str(source)):
        raise ValueError(problem)
    fields = {key: params[key] for key in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of",
                                           "ffn_dim_multiplier", "norm_eps", "max_seq_len") if key in params}
    fields["ffn_hidden_dim"] = None  # Meta's size is always the multiple_of / ffn_dim_multiplier rule
    fields["n_kv_heads"] = params.get("n_kv_heads")
    fields["rope_theta"] = float(params.get("rope_theta", 10000.0))
    for key in ("norm_eps", "ffn_dim_multiplier"):
        if fields.get(key) is not None:
            fields[key] = float(fields[key])
    if params.get("use_scaled_rope"):
        fields["rope_scaling"] = RopeScaling(factor=float(params.get("rope_scaling_factor", META_ROPE_SCALING.factor)))
    fields["tie_embeddings"] = False
    return fields


def _ffn_rule(cfg: ModelConfig) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's rule yields cfg.hidden_dim exactly."""
    hidden = cfg.hidden_dim
    base = int(2 * 4 * cfg.dim / 3)
    candidates = [(cfg.multiple_of, cfg.ffn_dim_multiplier), (cfg.multiple_of, hidden / base),
                  (hidden, None if hidden >= base else hidden / base)]
    for multiple_of, multiplier in candidates:
        rule = ModelConfig(dim=cfg.dim, n_heads=cfg.n_heads, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        if rule.hidden_dim == hidden:
            return multiple_of, multiplier
    raise ValueError(f"params.json cannot express ffn size {hidden} for dim={cfg.dim} with Meta's "
                     f"multiple_of/ffn_dim_multiplier rule")


def meta_params_dict(cfg: ModelConfig) -> dict:
    """params.json contents for `cfg`; a ValueError if Meta's format cannot express the config."""
    multiple_of, multiplier = _ffn_rule(cfg)
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size,
              "multiple_of": multiple_of, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}
    if cfg.kv_heads != cfg.n_heads:
        params["n_kv_heads"] = cfg.kv_heads
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        if (s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) != (
                META_ROPE_SCALING.low_freq_factor, META_ROPE_SCALING.high_freq_factor,
                META_ROPE_SCALING.original_max_position_embeddings):
            raise ValueError(f"params.json cannot express rope_scaling={s}: Meta's use_scaled_rope fixes "
                             f"low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192")
        params["use_scaled_rope"] = True
        if s.factor != META_ROPE_SCALING.factor:
            params["rope_scaling_factor"] = s.factor
    return params
