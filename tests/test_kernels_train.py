"""A training step of a tiny model with `attention_impl=pallas_gpu` (interpret mode here) equals one with `xla`.

Oracle: the same step with the `xla` reference attention. The batch packs two documents per row with
padding, so segment ids and fully masked rows reach the kernel. The optimizer is `optax.trace` with
decay 0, whose state after the step is exactly the gradient the step computed; comparing parameters
before and after an SGD step instead would lose the gradient of a norm scale (≈ 1e-3) to the rounding of
the scale itself (1.0, one ulp = 1.2e-7), which on a GPU exceeded the tolerance.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama_jax.model.config import ModelConfig
from llama_jax.model.api import init_params
from llama_jax.training.step import init_train_state, train_step

CFG = ModelConfig(vocab_size=97, dim=128, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden_dim=128,
                  dtype="float32", attention_impl="xla", max_seq_len=48)


def _packed_batch(rows: int, length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, length + 1))
    cut, pad = length // 3, length - 5
    seg = np.ones((rows, length), np.int32)
    seg[:, cut:] = 2
    seg[:, pad:] = 0
    positions = np.where(np.arange(length) < cut, np.arange(length), np.arange(length) - cut)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(np.broadcast_to(positions, (rows, length))),
            "loss_mask": jnp.asarray((seg > 0).astype(np.float32))}


def test_train_step_with_pallas_gpu_equals_xla():
    opt = optax.trace(decay=0.0)
    state = init_train_state(init_params(CFG, seed=3), opt)
    batch = _packed_batch(2, 40, seed=4)
    step = jax.jit(train_step, static_argnames=("model_cfg", "optimizer"))
    ref_state, ref = step(state, batch, model_cfg=CFG, optimizer=opt)
    traced = step.trace(state, batch, model_cfg=CFG.replace(attention_impl="pallas_gpu"), optimizer=opt)
    assert str(traced.jaxpr).count("pallas_call") >= 3  # forward, dK/dV and dQ kernels are really in the step
    got_state, got = traced.lower().compile()(state, batch)
    assert abs(float(got["loss"]) - float(ref["loss"])) <= 1e-6 * float(ref["loss"])
    assert abs(float(got["grad_norm"]) - float(ref["grad_norm"])) <= 1e-5 * float(ref["grad_norm"])
    got_grads, ref_grads = got_state.opt_state.trace, ref_state.opt_state.trace
    for path, g, w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(got_grads),
                          jax.tree.leaves(ref_grads)):
        scale = np.abs(np.asarray(w)).max()
        assert scale > 0, jax.tree_util.keystr(path[0])
        assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * scale, jax.tree_util.keystr(path[0])
