"""LoRA dropout: x W + scale · dropout(x) A B in training only, masks from (seed, step, micro-batch).

Oracles: a numpy evaluation of the formula with the mask recovered by probing the layer (identity adapters
on a ones input); transformers' LlamaForCausalLM (torch fp32) with the adapters added by forward hooks on
its projections, each with its mask drawn from the same key; numpy's loss of the merged model (evaluation
never drops out); an uninterrupted pair of steps (resume).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model import api, transformer
from llama_jax.model.config import ModelConfig
from llama_jax.model.lora import LoraConfig, adapter_shapes, merge, unmerged
from llama_jax.model.transformer import Adapter, Linear, dropout_keys
from llama_jax.training.step import OptimizerConfig, make_optimizer, eval_step, init_train_state, train_step
from llama_jax.utils.config_io import ConfigError
from llama_jax.utils.trees import flatten, unflatten

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64,
                  dtype="float32", attention_impl="xla", max_seq_len=32)
TARGETS = {"wq": ("attention", "self_attn.q_proj"), "wv": ("attention", "self_attn.v_proj"),
           "w2": ("feed_forward", "mlp.down_proj")}
RATE = 0.3
LORA = LoraConfig(rank=4, alpha=8.0, targets=list(TARGETS), dropout=RATE)


def trained_adapters(seed: int) -> dict:
    """Adapters with B != 0, so the adapter path contributes to the output."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(rng.normal(size=x.shape) * 0.2, np.float32), adapter_shapes(CFG, LORA))


def random_base(seed: int) -> dict:
    """Base weights: normal(0, 0.1) matrices, norm scales around 1 (cheaper than compiling an initialiser)."""
    rng = np.random.default_rng(seed)
    return unflatten({path: np.asarray((1.0 if path[-1] == "scale" else 0.0) + 0.1 * rng.normal(size=s.shape), np.float32)
                      for path, s in flatten(api.param_shapes(CFG)).items()})


def batch_of(seed: int, rows: int = 2, length: int = 12) -> dict:
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (rows, length + 1))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((rows, length), np.float32)}


def test_adapter_adds_the_scaled_low_rank_product_of_the_dropped_out_input():
    """numpy: x W + scale · (x ⊙ m / (1 - p)) A B, m the keep mask the same key gives (recovered by probing
    with W = 0, A = B = I, scale 1 on ones); the mask keeps about 1 - p of the inputs, the base path none dropped."""
    rng = np.random.default_rng(0)
    fan_in, fan_out, rank, tokens, key = 16, 24, 3, 256, jax.random.key(7)
    linear = Linear(fan_in, fan_out, ("embed", "mlp"), CFG, rngs=None)
    w = rng.normal(size=(fan_in, fan_out)).astype(np.float32)
    linear.kernel[...] = w
    x = rng.normal(size=(tokens, fan_in)).astype(np.float32)
    a, b = (rng.normal(size=s).astype(np.float32) for s in ((fan_in, rank), (rank, fan_out)))
    y = np.asarray(linear(x, Adapter(a, b, key, 2.0, RATE)), np.float64)

    probe = Linear(fan_in, fan_in, ("embed", "mlp"), CFG, rngs=None)
    probe.kernel[...] = np.zeros((fan_in, fan_in), np.float32)
    eye = np.eye(fan_in, dtype=np.float32)
    kept = np.asarray(probe(np.ones_like(x), Adapter(eye, eye, key, 1.0, RATE)), np.float64)
    assert set(np.unique(np.round(kept, 5))) == {0.0, round(1 / (1 - RATE), 5)}
    mask = kept * (1 - RATE)
    assert abs(mask.mean() - (1 - RATE)) < 0.03  # 4,096 draws: 5 standard deviations

    x64 = x.astype(np.float64)
    expected = x64 @ w + 2.0 * ((x64 * mask / (1 - RATE)) @ a @ b)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(y - (x64 @ w + 2.0 * (x64 @ a @ b))).max() > 0.1  # the mask really changes the output


def test_model_with_dropped_out_adapters_equals_transformers_with_the_same_masks():
    """Every adapted projection of every layer gets its own mask from `dropout_keys` (the hooks draw them
    independently by name and layer) and only the adapter's input is dropped."""
    import torch

    from oracle import hf_model
    from llama_jax.model.params import params_from_torch

    hf = hf_model(CFG, seed=3)
    base = params_from_torch({k: v.detach().numpy() for k, v in hf.state_dict().items()}.__getitem__, CFG, "hf")
    adapters, key = trained_adapters(4), jax.random.key(11)
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 9))
    keys = dropout_keys(key, adapters["layers"], CFG.n_layers)

    def hook(layer: int, target: str):
        group, _ = TARGETS[target]
        a, b = (adapters["layers"][group][target][n][layer].astype(np.float64) for n in ("a", "b"))
        fan_in = a.shape[0]
        keep = np.asarray(jax.random.bernoulli(keys[group][target][layer], 1 - RATE, (tokens.size, fan_in)))

        def add_adapter(module, inputs, output):
            x = inputs[0].double().reshape(-1, fan_in).numpy()
            delta = LORA.scale * ((x * keep / (1 - RATE)) @ a @ b)
            return output + torch.as_tensor(delta.reshape(output.shape), dtype=output.dtype)
        return add_adapter

    masks = [np.asarray(jax.random.bernoulli(keys[group][target][layer], 0.5, (tokens.size, CFG.dim)))
             for target, (group, _) in TARGETS.items() for layer in range(CFG.n_layers)]
    assert all(not np.array_equal(m, n) for i, m in enumerate(masks) for n in masks[i + 1:])  # independent keys
    for layer, block in enumerate(hf.model.layers):
        for target, (_, name) in TARGETS.items():
            block.get_submodule(name).register_forward_hook(hook(layer, target))
    with torch.no_grad():
        expected = hf(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(jax.jit(lambda p, t, a: transformer.apply(CFG, p, t, lora=unmerged(a, LORA, key))[0])(
        base, tokens, adapters))
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)
    without_dropout = np.asarray(transformer.apply(CFG, merge(base, adapters, LORA), tokens)[0])
    assert np.abs(without_dropout - expected).max() > 1e-2  # the masks matter at this tolerance


@pytest.fixture(scope="module")
def steps():
    """The jitted train step `(state, batch, base, seed)` with dropout, two micro-batches (and one)."""
    optimizer = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=0), 10)

    def jitted(micro_batches):
        return jax.jit(lambda s, b, f, seed: train_step(s, b, f, model_cfg=CFG, optimizer=optimizer, lora=LORA,
                                                        micro_batches=micro_batches, seed=seed))
    return {"state": init_train_state(trained_adapters(1), optimizer), "base": random_base(0), "dropout": jitted(2),
            "one_micro_batch": jitted(1)}


def test_training_drops_out_evaluation_does_not(steps):
    """eval_step with dropout configured is the merged model's loss (numpy log-softmax on its logits);
    the train step's loss (with dropout) is another."""
    state, base, batch = steps["state"], steps["base"], batch_of(0, rows=4)
    evaluated = jax.jit(lambda p, b, f: eval_step(p, b, f, model_cfg=CFG, lora=LORA))(state.params, batch, base)
    merged = merge(base, state.params, LORA)
    logits = np.asarray(jax.jit(lambda w, t: transformer.apply(CFG, w, t)[0])(merged, batch["inputs"]), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    model_loss = -np.take_along_axis(log_probs, batch["targets"][..., None], -1).mean()
    np.testing.assert_allclose(float(evaluated["nll_sum"] / evaluated["tokens"]), model_loss, rtol=1e-5)
    _, dropped = steps["dropout"](state, batch, base, 0)
    assert abs(float(dropped["loss"]) - model_loss) > 1e-3


def test_masks_depend_on_seed_and_step_only_so_a_resumed_run_repeats_the_uninterrupted_one(steps):
    """Two steps in a row against the second step rerun from a host copy of the first one's state (what a
    checkpoint restores): bitwise equal. Another seed or step count draws other masks, and so does each
    micro-batch: rows [A, B] twice in two micro-batches do not repeat the loss of [A, B] in one (they would,
    bitwise, with the same masks)."""
    state, base = steps["state"], steps["base"]
    first, _ = steps["dropout"](state, batch_of(1, rows=4), base, 0)
    saved = jax.tree.map(np.array, first)
    second, metrics = steps["dropout"](first, batch_of(2, rows=4), base, 0)
    resumed, resumed_metrics = steps["dropout"](jax.tree.map(jnp.asarray, saved), batch_of(2, rows=4), base, 0)
    for x, y in zip(jax.tree.leaves(second), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, y)
    assert float(metrics["loss"]) == float(resumed_metrics["loss"])

    other_seed = float(steps["dropout"](jax.tree.map(jnp.asarray, saved), batch_of(2, rows=4), base, 1)[1]["loss"])
    other_step = float(steps["dropout"](jax.tree.map(jnp.asarray, saved).replace(step=jnp.asarray(5, jnp.int32)),
                                        batch_of(2, rows=4), base, 0)[1]["loss"])
    assert other_seed != float(metrics["loss"]) and other_step != float(metrics["loss"])
    rows = batch_of(3, rows=2)
    twice = jax.tree.map(lambda x: np.concatenate([x, x]), rows)
    assert float(steps["dropout"](state, twice, base, 0)[1]["loss"]) != float(
        steps["one_micro_batch"](state, rows, base, 0)[1]["loss"])


@pytest.mark.parametrize("rate", [1.0, -0.1, float("nan")])
def test_dropout_must_lie_in_zero_one(rate):
    with pytest.raises(ConfigError, match=r"^lora.dropout must be in \[0, 1\), got") as err:
        LoraConfig(rank=4, dropout=rate)
    assert "\n" not in str(err.value)


def test_dropout_is_read_from_the_training_config():
    from llama_jax.training.config import load_train_config

    assert load_train_config(None, ["lora.rank=4", "lora.dropout=0.05", "init_from=x"]).lora.dropout == 0.05
    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\), got 1.0"):
        load_train_config(None, ["lora.rank=4", "lora.dropout=1", "init_from=x"])
