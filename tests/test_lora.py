"""LoRA: the merge rule, the adapted model at step 0, what a train step changes, train.py end to end.

Oracles: numpy's W + (alpha/rank)·A·B per layer; the base model's own weights and logits; the base
weights and a LoRA run's checkpoint contents; transformers on the merged Hugging Face export.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from llama_jax.model import api, transformer
from llama_jax.model.config import ModelConfig
from llama_jax.model.lora import LoraConfig, adapter_count, init_adapters, merge
from llama_jax.training.step import OptimizerConfig, make_optimizer, init_train_state, train_step
from llama_jax.utils.config_io import ConfigError
from llama_jax.utils.trees import flatten, unflatten

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64,
                  dtype="float32", attention_impl="xla", max_seq_len=32)
LORA = LoraConfig(rank=4, alpha=8.0, targets=["wq", "wv", "w2"])


def random_adapters(seed: int) -> dict:
    """Adapters with B != 0 (a trained state), so the merge really adds something."""
    adapters = init_adapters(CFG, LORA, seed)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(rng.normal(size=x.shape), np.float32), adapters)


def test_merge_is_base_plus_scaled_low_rank_product():
    base, adapters = api.init_params(CFG, 0), random_adapters(1)
    merged = flatten(merge(base, adapters, LORA))
    flat_adapters = flatten(adapters)
    adapted = 0
    for path, weight in flatten(base).items():
        a = flat_adapters.get(path[:-1] + ("a",))
        if a is None:
            np.testing.assert_array_equal(merged[path], weight)
            continue
        b = flat_adapters[path[:-1] + ("b",)]
        expected = np.stack([np.asarray(weight[l], np.float64) + 2.0 * (a[l].astype(np.float64) @ b[l])
                             for l in range(CFG.n_layers)])
        np.testing.assert_allclose(merged[path], expected, rtol=1e-6, atol=1e-6)
        adapted += 1
    assert adapted == 3 and adapter_count(CFG, LORA) == 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))  # layers·rank·(in + out)


def test_at_step_zero_the_adapted_model_is_the_base_model():
    base = api.init_params(CFG, 0)
    merged = merge(base, init_adapters(CFG, LORA, 5), LORA)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    tokens = np.arange(16).reshape(2, 8) % CFG.vocab_size
    np.testing.assert_array_equal(transformer.apply(CFG, merged, tokens)[0], transformer.apply(CFG, base, tokens)[0])


def test_a_train_step_changes_only_the_adapters_and_keeps_moments_only_for_them():
    base = api.init_params(CFG, 0)
    optimizer = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=0), 10)
    state = init_train_state(init_adapters(CFG, LORA, 1), optimizer)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim == 3)
    assert moments == 2 * adapter_count(CFG, LORA)  # Adam's mu and nu, for the adapters only
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, 17))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((2, 16), np.float32)}
    step = jax.jit(lambda s, b, f: train_step(s, b, f, model_cfg=CFG, optimizer=optimizer, lora=LORA))
    before = jax.tree.map(np.array, base)
    new_state, metrics = step(state, batch, base)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    changed = {path: not np.array_equal(new, old) for (path, new), old in
               zip(flatten(new_state.params).items(), flatten(state.params).values())}
    assert all(changed[p] for p in changed if p[-1] == "b")  # B leaves zero: the adapters learn
    assert float(step(new_state, batch, base)[1]["loss"]) < float(metrics["loss"])


def test_a_bf16_base_keeps_the_adapters_contribution_in_fp32():
    """base_dtype=bfloat16 halves the frozen weights; the adapted kernels come out in fp32 with the whole
    update added, however small (no rounding of the update to bf16's resolution)."""
    base = api.init_params(CFG, 0)
    base16 = jax.tree.map(lambda x: x.astype("bfloat16"), base)
    adapters = jax.tree.map(lambda x: x * 1e-3, random_adapters(2))  # far below bf16's resolution near |W|
    merged, exact, flat16, flat32 = (flatten(t) for t in (merge(base16, adapters, LORA),
                                                          merge(base, adapters, LORA), base16, base))
    targets = 0
    for path, value in merged.items():
        if len(path) > 1 and path[-2] in LORA.targets:
            targets += 1
            assert value.dtype == np.float32
            update = np.asarray(value) - np.asarray(flat16[path], np.float32)
            np.testing.assert_allclose(update, np.asarray(exact[path]) - np.asarray(flat32[path]), atol=1e-7)
            assert np.abs(update).max() > 0
        else:
            assert value.dtype == jax.numpy.bfloat16
    assert targets == 3


def test_config_checks():
    with pytest.raises(ConfigError, match="lora.targets"):
        LoraConfig(rank=4, targets=["wz"])
    from llama_jax.training.config import load_train_config

    with pytest.raises(ConfigError, match="lora.rank > 0 needs init_from"):
        load_train_config(None, ["lora.rank=4"])


def test_train_py_lora_run_saves_adapters_resumes_and_exports_merged_to_transformers(tmp_path):
    """train.py with lora.rank (and dropout): checkpoints hold only the adapters (+ the base's path), a rerun
    resumes, and `convert --to hf` merges them: transformers' logits equal ours for base + scale·A·B (fp32)."""
    import torch
    import transformers

    from llama_jax.checkpoint.params import verified_params_item, restore_numpy, save_params, stored_param_metadata
    from llama_jax.convert.pipeline import convert
    from llama_jax.checkpoint.run import RunCheckpoints
    from llama_jax.training.config import load_train_config
    from llama_jax.training.loop import train
    from test_sft_train import overrides, write_chat_files

    files = write_chat_files(tmp_path / "data")
    lora_args = {"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "[wq, wv, w2]", "lora.dropout": 0.1, "steps": 2}
    model_cfg = load_train_config(None, overrides(files, tmp_path / "x", **lora_args, init_from="x")).model
    base = api.init_params(model_cfg, 7)
    save_params(tmp_path / "base", base, model_cfg)
    args = overrides(files, tmp_path / "run", init_from=str(tmp_path / "base"), **lora_args)
    first = train(load_train_config(None, args))
    ckpt = RunCheckpoints(tmp_path / "run", keep=5)
    assert set(p[-1] for p in ckpt.param_shapes(2)) == {"a", "b"}  # adapters only
    meta = [json.loads(f.read_text()) for f in (tmp_path / "run" / "checkpoints" / "2" / "meta").rglob("*")
            if f.is_file() and "lora_base" in f.read_text()]
    assert meta and meta[0]["lora_base"] == str(tmp_path / "base")  # the pointer to the base
    ckpt.close()
    resumed = train(load_train_config(None, args + ["steps=3"]))
    assert resumed.first_step == 3 and len(first.losses) == 2

    item = verified_params_item(tmp_path / "run")
    adapters = flatten(restore_numpy(item, stored_param_metadata(item)))
    expected = {}
    for path, weight in flatten(base).items():
        a = adapters.get(path[:-1] + ("a",))
        expected[path] = weight if a is None else weight + 2.0 * np.einsum(
            "lir,lro->lio", a, adapters[path[:-1] + ("b",)])
    assert any(not np.array_equal(expected[p], w) for p, w in flatten(base).items())
    convert(tmp_path / "run", tmp_path / "hf", to="hf", progress=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = np.arange(24).reshape(2, 12) % model_cfg.vocab_size
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(transformer.apply(model_cfg, unflatten(expected), tokens)[0])
    np.testing.assert_allclose(hf_logits, ours, atol=1e-4, rtol=0)
