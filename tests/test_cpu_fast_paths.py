"""The XLA:CPU fast paths live in one module, change no number, and stay out of GPU/TPU programs.

Oracles: each function's plain form (`plain_*`, what a GPU or TPU runs) for values and gradients; the
lowered programs' text for where the variants are (their named scope `xla_cpu_fast_path`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from llama_jax.model import api, cpu_fast_paths
from llama_jax.model.attention import attention_mask
from llama_jax.model.config import ModelConfig
from llama_jax.training.step import batch_nll

SCOPE = cpu_fast_paths.SCOPE
CFG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96, max_seq_len=64,
                  dtype="bfloat16", attention_impl="xla")
BATCH = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32) for k in ("inputs", "targets", "loss_mask")}


def loss_grad():
    return jax.jit(jax.grad(lambda p, b: batch_nll(CFG, p, b)[0]))


def exported_text(platform: str) -> str:
    """The train step's gradient exported for `platform`, with op locations (named scopes) kept."""
    exported = export.export(loss_grad(), platforms=[platform])(api.param_shapes(CFG), BATCH)
    return exported.mlir_module()


def test_cpu_programs_hold_the_fast_paths_and_the_switch_removes_them(monkeypatch):
    assert SCOPE in exported_text("cpu")
    monkeypatch.setenv(cpu_fast_paths.SWITCH, "0")
    assert SCOPE not in exported_text("cpu")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_programs_traced_on_a_gpu_or_tpu_host_hold_none_of_them(monkeypatch, platform):
    """What a GPU/TPU host traces: no fast-path op and no platform switch at all."""
    monkeypatch.setattr(jax, "default_backend", lambda: {"cuda": "gpu"}.get(platform, platform))
    text = exported_text(platform)
    assert SCOPE not in text and "stablehlo.case" not in text
    assert text.count("stablehlo.dot_general") >= 3 * 2 * CFG.n_layers  # the model's products are all there


# bf16: a few bf16 ulps of the largest value (the variants accumulate in another order)
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_each_fast_path_equals_its_plain_form_with_gradients(dtype, tol):
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((24, 16), (16, 8)))
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((2, 6, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)))
    logits = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 32, (2, 6)), jnp.int32)
    mask = attention_mask(6, 6, jnp.asarray([[1, 1, 1, 2, 2, 0]] * 2))
    cases = [
        (lambda a, b: cpu_fast_paths.matmul(a, b, jnp.float32), cpu_fast_paths.plain_matmul, (a, b)),
        (lambda q, k, v: cpu_fast_paths.grouped_query_products(q, k, v, mask)[0],
         lambda q, k, v: cpu_fast_paths.plain_grouped_query_products(q, k, v, mask)[0], (q, k, v)),
        (lambda x: cpu_fast_paths.target_logit(x, targets), lambda x: cpu_fast_paths.plain_target_logit(x, targets),
         (logits,)),
    ]
    for fast, plain, args in cases:
        def value_and_grads(fn):
            out, vjp = jax.vjp(lambda *x: fn(*x).astype(jnp.float32), *args)
            return (out,) + vjp(jnp.cos(out))

        for got, want in zip(jax.jit(lambda *_: value_and_grads(fast))(), jax.jit(lambda *_: value_and_grads(plain))()):
            scale = float(jnp.max(jnp.abs(want.astype(jnp.float32)))) or 1.0
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            assert err <= tol * scale, (fast, err, scale)
