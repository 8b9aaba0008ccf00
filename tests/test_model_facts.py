"""The model's facts against independent oracles: FLOPs per token against a count over the model's own
parameter tree, the fields' roles (shape / execution) against what changing each one does to the
weights and to the computed log-probabilities, and the Hugging Face tensor table against transformers'
LlamaForCausalLM."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
import pytest
import transformers

from llama_jax.model import api, transformer
from llama_jax.model.attention import resolve_attention
from llama_jax.model.config import EXECUTION_FIELDS, SHAPE_FIELDS, ModelConfig, RopeScaling
from llama_jax.model.external_config import hf_config_dict
from llama_jax.model.params import tensor_maps, torch_name, torch_shape

# Grouped-query attention, so that n_heads changes a shape (through head_dim) and n_kv_heads can shrink;
# the ffn size by Meta's rule (int(2·4·64/3) = 170, rounded up to 256), so multiple_of and the multiplier
# change it; fp32 compute and init_std 0.1 (attention far enough from uniform that rotary changes show).
BASE = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, init_std=0.1,
                   dtype="float32")
# Another valid value of every field.
OTHER = {"vocab_size": 120, "dim": 96, "n_layers": 3, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden_dim": 80,
         "multiple_of": 64, "ffn_dim_multiplier": 2.0, "norm_eps": 0.5, "rope_theta": 1e6,
         "rope_scaling": RopeScaling(factor=8.0, original_max_position_embeddings=16), "max_seq_len": 64,
         "tie_embeddings": True, "init_std": 0.05, "param_dtype": "bfloat16", "dtype": "bfloat16",
         "attention_impl": "xla", "scan_layers": False, "remat": "full", "loss_chunk_size": 4}
FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


def test_every_field_has_another_value_to_try():
    assert sorted(OTHER) == sorted(FIELDS)
    for name, value in OTHER.items():
        assert getattr(BASE, name) != value, name


def matmul_elements_from_the_model(cfg: ModelConfig) -> int:
    """Elements of every parameter a matmul reads, from the model's own parameter tree: every kernel,
    plus the embedding table when tied (it is then also the output projection)."""
    shapes = api.flat_param_shapes(cfg)
    kernels = sum(math.prod(shape) for path, shape in shapes.items() if path[-1] == "kernel")
    return kernels + (math.prod(shapes[("tok_embeddings",)]) if cfg.tie_embeddings else 0)


@pytest.mark.parametrize("cfg", [
    BASE, BASE.replace(n_kv_heads=None, tie_embeddings=True), BASE.replace(ffn_dim_multiplier=1.3, n_layers=3),
    ModelConfig(vocab_size=50, dim=48, n_layers=1, n_heads=6, n_kv_heads=3, ffn_hidden_dim=40)])
def test_flops_per_token_counts_the_models_matmul_parameters_and_attention(cfg):
    assert cfg.matmul_params == matmul_elements_from_the_model(cfg)
    assert cfg.flops_per_token(32) == 6 * matmul_elements_from_the_model(cfg) + 12 * cfg.n_layers * cfg.dim * 32


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                      max_seq_len=32, tie_embeddings=False)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96  # wq, wo; wk, wv (2 kv heads × 16); w1, w2, w3
    matmul_params = 2 * per_layer + 64 * 100  # + output projection; the embedding lookup is not a matmul
    assert cfg.flops_per_token(32) == 6 * matmul_params + 12 * 2 * 64 * 32
    tied = cfg.replace(tie_embeddings=True)  # the shared table is counted once, as the projection
    assert tied.flops_per_token(32) == 6 * matmul_params + 12 * 2 * 64 * 32


@pytest.mark.parametrize("name", FIELDS)
def test_shape_fields_are_exactly_those_that_change_the_parameter_shapes(name):
    changed = api.flat_param_shapes(BASE.replace(**{name: OTHER[name]})) != api.flat_param_shapes(BASE)
    assert changed == (name in SHAPE_FIELDS), f"{name}: changes the shapes: {changed}"


@pytest.mark.parametrize("variant", [
    *(BASE.replace(**{name: OTHER[name]}) for name in SHAPE_FIELDS),
    BASE.replace(ffn_hidden_dim=BASE.hidden_dim, multiple_of=32),  # the same sizes spelled otherwise
    BASE.replace(n_kv_heads=None, n_heads=2), BASE.replace(tie_embeddings=True)])
def test_weight_sizes_agree_exactly_when_the_untied_shapes_do(variant):
    def untied_shapes(cfg):
        return api.flat_param_shapes(cfg.replace(tie_embeddings=False))

    assert (variant.weight_sizes() == BASE.weight_sizes()) == (untied_shapes(variant) == untied_shapes(BASE))


TOKENS = np.random.default_rng(0).integers(0, BASE.vocab_size, (2, 12)).astype(np.int32)


def log_probs(cfg: ModelConfig, params) -> np.ndarray:
    cfg = resolve_attention(cfg, "cpu")  # as a program built for this machine does
    return np.asarray(transformer.target_log_probs(cfg, params, TOKENS[:, :-1], TOKENS[:, 1:])[0])


@functools.cache
def base_weights_and_log_probs():
    params = api.init_params(BASE, seed=1)
    return params, log_probs(BASE, params)


@pytest.mark.parametrize("name", [n for n in FIELDS if n not in SHAPE_FIELDS])
def test_execution_fields_are_exactly_those_that_keep_the_weights_and_the_function(name):
    """An execution field leaves the initial weights bit for bit and the log-probabilities up to the
    precision it selects (|log p| ≤ 6.1 here: fp32 within 1e-5, measured ≤ 1e-6; bf16 matmuls within 0.1,
    measured 0.035); any other field that keeps the shapes changes one or the other (the smallest change,
    rope_theta's, measured 0.31)."""
    cfg = BASE.replace(**{name: OTHER[name]})
    atol = 1e-5 if cfg.dtype == "float32" else 0.1
    base_params, expected = base_weights_and_log_probs()
    params = api.init_params(cfg, seed=1)
    same_weights = all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in
                       zip(jax.tree.leaves(base_params), jax.tree.leaves(params)))
    same_function = np.allclose(log_probs(cfg, base_params), expected, rtol=0, atol=atol)
    assert (same_weights and same_function) == (name in EXECUTION_FIELDS), (
        f"{name}: same weights {same_weights}, same function {same_function}")


@pytest.mark.parametrize("cfg", [BASE, BASE.replace(tie_embeddings=True, n_kv_heads=None)])
def test_hf_tensor_table_names_every_tensor_of_transformers_llama_with_its_shape(cfg):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg)))
    state = {name: tuple(t.shape) for name, t in hf.state_dict().items()}
    if cfg.tie_embeddings:  # transformers lists the shared table twice; our table names it once
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
        del state["lm_head.weight"]
    ours = {torch_name(tmap, "hf", layer): torch_shape(tmap, cfg) for tmap in tensor_maps(cfg)
            for layer in (range(cfg.n_layers) if tmap.per_layer else (None,))}
    assert ours == state
