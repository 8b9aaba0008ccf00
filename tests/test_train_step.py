"""The shared train step: schedule values, weight-decay mask, accumulation equals one large batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax.model.config import ModelConfig
from llama_jax.training.step import (OptimizerConfig, decay_mask, lr_schedule, make_optimizer, init_train_state,
                                     train_step)
from llama_jax.model.api import init_params
from llama_jax.model.transformer import token_nll

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64,
                  dtype="float32", attention_impl="xla", max_seq_len=32)


def test_schedule_warmup_midpoint_end():
    cfg = OptimizerConfig(peak_lr=1e-3, warmup_steps=100, min_lr_ratio=0.1)
    sched = lr_schedule(cfg, total_steps=1100)
    assert float(sched(0)) == 0.0
    assert float(sched(50)) == pytest.approx(5e-4, rel=1e-6)
    assert float(sched(100)) == pytest.approx(1e-3, rel=1e-6)
    # halfway through the cosine: (peak + end) / 2
    assert float(sched(600)) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-5)
    assert float(sched(1100)) == pytest.approx(1e-4, rel=1e-6)


def test_weight_decay_skips_norm_scales_only():
    mask = decay_mask(init_params(CFG))
    assert mask["layers"]["attention_norm"]["scale"] is False
    assert mask["layers"]["ffn_norm"]["scale"] is False
    assert mask["norm"]["scale"] is False
    assert mask["tok_embeddings"] is True and mask["layers"]["attention"]["wq"]["kernel"] is True


def _batch(rows, length, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, length + 1))
    mask = (rng.random((rows, length)) > 0.2).astype(np.float32)  # uneven token counts per row
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.asarray(mask)}


@pytest.mark.parametrize("opt", [optax.sgd(1.0), make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=0), 10)],
                         ids=["sgd", "adamw"])
def test_gradient_accumulation_equals_one_large_batch(opt):
    """With SGD the update is the gradient itself; with AdamW its first step is ~lr·sign(g)."""
    state = init_train_state(init_params(CFG, seed=1), opt)
    batch = _batch(8, 16, seed=2)
    step = jax.jit(train_step, static_argnames=("model_cfg", "optimizer", "schedule", "micro_batches"))
    big, m_big = step(state, batch, model_cfg=CFG, optimizer=opt, micro_batches=1)
    acc, m_acc = step(state, batch, model_cfg=CFG, optimizer=opt, micro_batches=4)
    assert float(m_acc["loss"]) == pytest.approx(float(m_big["loss"]), rel=1e-6)
    assert float(m_acc["grad_norm"]) == pytest.approx(float(m_big["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # and the update really moved the weights
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(big.params), jax.tree.leaves(state.params)))
    assert moved > 1e-4


def test_loss_decreases_on_repeated_batch():
    opt = make_optimizer(OptimizerConfig(peak_lr=3e-3, warmup_steps=0), total_steps=20)
    state = init_train_state(init_params(CFG, seed=3), opt)
    batch = _batch(4, 16, seed=4)
    step = jax.jit(lambda s, b: train_step(s, b, model_cfg=CFG, optimizer=opt))
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 1.0 and losses == sorted(losses, reverse=True), losses


def test_token_nll_and_its_gradient_equal_the_textbook_formula():
    """token_nll picks the target logit with a custom gradient; the oracle is log_softmax + gather."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 5)), jnp.int32)
    weights = jnp.asarray(rng.random((3, 5)), jnp.float32)  # a different cotangent for every token

    def ours(x):
        return jnp.sum(token_nll(x, targets) * weights)

    def textbook(x):
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], axis=-1)[..., 0] * weights)

    np.testing.assert_allclose(ours(logits), textbook(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(textbook)(logits), rtol=0, atol=1e-6)
    bf16 = logits.astype(jnp.bfloat16)  # bf16 logits are scored in fp32; the gradient comes back as bf16
    assert jax.grad(ours)(bf16).dtype == jnp.bfloat16
    np.testing.assert_allclose(jax.grad(ours)(bf16).astype(jnp.float32),
                               jax.grad(textbook)(bf16.astype(jnp.float32)), rtol=0, atol=1e-2)
