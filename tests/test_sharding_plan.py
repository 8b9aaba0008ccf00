"""`plan`: exact per-device state bytes (hand-counted LLaMA-1 65B), the printed report, errors, and the
activation estimate against XLA's own buffer assignment. (The live-shard cross-check is in
tests/test_sharding.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax.model.config import ModelConfig, load_model_config
from llama_jax.training.plan import GIB, activation_bytes, plan_cli, state_bytes_per_device
from llama_jax.parallel.rules import RULE_PRESETS, rules_for
from llama_jax.training.config import load_train_config
from llama_jax.training.step import OptimizerConfig, make_optimizer, batch_nll
from llama_jax.model.api import init_params

ROOT = Path(__file__).resolve().parent.parent
PLAN_65B = ["model=llama1-65b", "mesh.fsdp=256", "devices=256", "global_batch_size=256", "seq_len=2048"]


def hand_counted_65b_bytes(fsdp: int) -> tuple[int, int]:
    """(bytes of fp32 parameters per device, of AdamW state per device), LLaMA-1 65B by hand."""
    vocab, dim, layers, hidden = 32000, 8192, 80, 22016
    matrices = 2 * vocab * dim + layers * (4 * dim * dim + 3 * dim * hidden)
    norms = (2 * layers + 1) * dim
    params = (matrices // fsdp + norms) * 4
    return params, 2 * params + 2 * 4  # mu and nu like the params, two int32 step counters


def test_state_bytes_65b_match_hand_count():
    cfg = load_model_config("llama1-65b")
    got = state_bytes_per_device(cfg, make_optimizer(OptimizerConfig(), 10), rules_for("fsdp"),
                                 {"data": 1, "fsdp": 256, "tensor": 1})
    params, optimizer = hand_counted_65b_bytes(256)
    assert got == {"params": params, "grads": params, "optimizer": optimizer}


def test_plan_cli_report(capsys):
    assert plan_cli(PLAN_65B + ["device_memory_gib=80"]) == 0
    out = capsys.readouterr().out
    for name, target in RULE_PRESETS["fsdp"]:  # the full rules table
        assert f"  {name:22s} {target if target else '-'}" in out
    params, optimizer = hand_counted_65b_bytes(256)
    assert f"parameters{params / GIB:30.2f}" in out and f"optimizer state{optimizer / GIB:25.2f}" in out
    assert "mesh: data=1 × fsdp=256 × tensor=1 (256 devices), strategy fsdp" in out
    assert "<- configured" in out.split("remat=save_matmuls")[1].splitlines()[0]
    assert "device memory 80 GiB: fits" in out
    assert plan_cli(PLAN_65B + ["device_memory_gib=16"]) == 0
    assert "device memory 16 GiB: DOES NOT FIT" in capsys.readouterr().out
    # the example on the default config's 8-row batch: a report plus a warning, not an error
    assert plan_cli(["model=llama1-65b", "mesh.fsdp=256"]) == 0
    assert "warning: 8 rows per micro-batch do not split over the 256 batch shards" in capsys.readouterr().out


def test_gradient_accumulation_counts_gradients_twice(capsys):
    """With micro_batches > 1 the step holds the accumulator and the current micro-batch's gradients: the
    report's gradients are 2 × the hand-counted parameter bytes (1 × without accumulation), and the total
    grows by exactly that one copy (4 micro-batches of 256 rows against one batch of 256 rows: the same
    activations)."""
    params, _ = hand_counted_65b_bytes(256)
    totals = {}
    for micro, copies in ((1, 1), (4, 2)):
        assert plan_cli(PLAN_65B + [f"micro_batches={micro}", f"global_batch_size={256 * micro}"]) == 0
        out = capsys.readouterr().out
        assert f"gradients{copies * params / GIB:31.2f}" in out, out
        assert "warning" not in out
        totals[micro] = float(next(line for line in out.splitlines() if line.startswith("  total")).split()[-1])
    assert totals[4] - totals[1] == pytest.approx(params / GIB, abs=0.011)  # two-decimal rounding of each


def test_plan_cli_errors(capsys):
    assert plan_cli(["model=llama1-65b", "mesh.fsdp=7", "devices=7", "global_batch_size=7"]) == 2
    assert "is not divisible by mesh axes fsdp of total size 7" in capsys.readouterr().err
    assert plan_cli(["model=llama1-7b", "mesh.tensor=2", "devices=8"]) == 2
    assert "never use them" in capsys.readouterr().err
    assert plan_cli(["model=llama1-7b", "devices=-2"]) == 2
    assert "devices and device_memory_gib must be >= 0" in capsys.readouterr().err


def test_plan_module_entry_point():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "llama_jax.training.plan"] + PLAN_65B, capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "gathered weights (transient)" in proc.stdout and "activations, remat=full" in proc.stdout


def test_activation_estimate_scales_with_mesh():
    cfg = load_model_config("llama1-7b")
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    est = {p: activation_bytes(cfg, rules_for("fsdp"), one, 8, 2048, p) for p in ("none", "save_matmuls", "full")}
    assert est["none"] > est["save_matmuls"] > est["full"]
    split = activation_bytes(cfg, rules_for("fsdp"), {"data": 2, "fsdp": 4, "tensor": 1}, 8, 2048, "full")
    assert split * 8 == pytest.approx(est["full"], rel=1e-6)
    tp = activation_bytes(cfg, rules_for("fsdp+tp"), {"data": 1, "fsdp": 1, "tensor": 2}, 8, 2048, "save_matmuls")
    assert tp < est["save_matmuls"]


def test_cudnn_counts_its_dense_mask_per_layer_and_row(capsys):
    """With segment ids jax hands cuDNN a boolean [T, T] mask per row and its bf16 bias: 3·T bytes per token
    of every layer kept for the backward pass (remat none), of the one layer recomputed otherwise; the flash
    kernel keeps none. Counted by hand against the `pallas_gpu` plan of the same model."""
    cfg = load_model_config("llama1-7b").replace(dtype="bfloat16")
    assert cfg.attention_impl == "auto"  # on a GPU: cudnn, up to 8,192 positions with segment ids
    one, rows, length = {"data": 1, "fsdp": 1, "tensor": 1}, 4, 2048
    for policy, layers_kept in (("none", cfg.n_layers), ("save_matmuls", 1), ("full", 1)):
        cudnn = activation_bytes(cfg, rules_for("fsdp"), one, rows, length, policy, "gpu")
        flash = activation_bytes(cfg.replace(attention_impl="pallas_gpu"), rules_for("fsdp"), one, rows, length,
                                 policy, "gpu")
        assert cudnn - flash == pytest.approx(rows * length * layers_kept * 3 * length, abs=1), policy
    assert plan_cli(["model=llama1-7b", "model.dtype=bfloat16", "platform=gpu", "devices=8"]) == 0
    assert "attention auto on gpu: cudnn (O(T) memory per row, a T×T mask with segment ids)" in capsys.readouterr().out


@pytest.mark.parametrize("policy", ["save_matmuls", "full"])  # `none` too, but 8 s more
def test_activation_estimate_close_to_xla_buffer_assignment(policy):
    """XLA:CPU's temporary bytes for the gradient of a small model: the estimate within 35%."""
    cfg = ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, ffn_hidden_dim=384, dtype="float32",
                      attention_impl="xla", max_seq_len=256, remat=policy)
    rows, length = 8, 256
    params = jax.eval_shape(lambda: init_params(cfg))
    spec = jax.ShapeDtypeStruct((rows, length), np.int32)
    batch = {"inputs": spec, "targets": spec, "loss_mask": jax.ShapeDtypeStruct((rows, length), np.float32)}
    grad = jax.jit(jax.grad(lambda p, b: batch_nll(cfg, p, b)[0]))
    measured = grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    estimate = activation_bytes(cfg, rules_for("fsdp"), {"data": 1, "fsdp": 1, "tensor": 1}, rows, length, policy)
    assert 0.65 <= estimate / measured <= 1.35, (estimate, measured)


@pytest.mark.parametrize("name,devices,mesh", [("llama1-7b", 64, "data=8 × fsdp=8 × tensor=1"),
                                               ("llama1-65b", 256, "data=1 × fsdp=256 × tensor=1")])
def test_shipped_configs_fit_80_gib_devices(name, devices, mesh, capsys):
    path = ROOT / "configs" / "train" / f"{name}.yaml"
    cfg = load_train_config(path)
    assert cfg.model.replace(remat="none") == load_model_config(name).replace(remat="none")
    assert cfg.global_batch_size * cfg.seq_len == 2048 * 2048  # the paper's 4M-token batches
    assert plan_cli([str(path), f"devices={devices}", "device_memory_gib=80"]) == 0
    out = capsys.readouterr().out
    assert f"mesh: {mesh} ({devices} devices)" in out and "device memory 80 GiB: fits" in out


LONG_CONTEXT = ROOT / "configs" / "train" / "llama3.1-8b-128k.yaml"


def hand_counted_8b_128k() -> dict[str, float]:
    """Per-device figures of the 128K config on 64 devices (fsdp=8 × context=8), by hand from the
    LLaMA 3.1 8B shape: 32 layers, dim 4096, vocab 128256, 32 heads of 128, 8 kv heads, SwiGLU 14336
    (1.3 × 8/3 × 4096 rounded up to a multiple of 1024)."""
    vocab, dim, layers, hidden, kv_dim = 128256, 4096, 32, 14336, 8 * 128
    matrices = 2 * vocab * dim + layers * (2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden)
    norms = (2 * layers + 1) * dim
    params = (matrices // 64 + norms) * 4  # fp32, matrices split over fsdp × context = 64
    tokens = 1 * 131072 // 8  # 8 rows per micro-batch over fsdp=8: one row, its 1/8 of the positions
    bf16 = 2
    everything = (dim * bf16 + (dim + 2 * kv_dim + 2 * dim + 2 * hidden) * bf16  # layer input, projections
                  + 2 * dim * 4 + (dim + kv_dim) * 4 + 2 * hidden * bf16 + dim * bf16 + 32 * 4)  # flash: row stats
    full = tokens * (layers * dim * bf16 + everything + dim * bf16) + (tokens // 64) * 3 * vocab * 4  # 64 chunks
    fsdp = 3 * 4 * 63 * params  # 4 micro-batches: gather twice, reduce-scatter once, each 63 shards
    context = 4 * layers * 2 * 7 / 8 * tokens * (2 * 32 * 128 + 2 * kv_dim) * bf16  # q, k, v, out; fwd + bwd
    return {"parameters": params, "gradients": 2 * params, "optimizer state": 2 * params + 8,
            "activations, remat=full": full, "FSDP": fsdp, "context": context}


def test_long_context_config_fits_and_its_figures_match_a_hand_count(capsys):
    cfg = load_train_config(LONG_CONTEXT)
    assert cfg.model.replace(remat="none", loss_chunk_size=2048) == load_model_config("llama3.1-8b").replace(
        remat="none")
    assert cfg.seq_len == 131072 == cfg.model.max_seq_len
    assert plan_cli([str(LONG_CONTEXT), "devices=64", "device_memory_gib=80"]) == 0
    out = capsys.readouterr().out
    assert "mesh: data=1 × fsdp=8 × context=8 × tensor=1 (64 devices)" in out
    assert "device memory 80 GiB: fits" in out
    assert "  activation_length      context" in out
    want = hand_counted_8b_128k()
    rows = {line[:34].strip(): float(line[34:].split()[0]) for line in out.split("per device")[1].splitlines()[1:9]}
    for label in ("parameters", "gradients", "optimizer state", "activations, remat=full"):
        assert rows[label] == pytest.approx(want[label] / GIB, abs=0.006), label
    traffic = {line[:42].strip(): tuple(map(float, line[42:].split()))
               for line in out.split("traffic per device per step")[1].splitlines()[1:]}
    assert traffic["FSDP gathers and reduce-scatters"] == pytest.approx((0, want["FSDP"] / GIB), abs=6e-4)
    assert traffic["context attention"] == pytest.approx((0, want["context"] / GIB), abs=6e-4)
    assert traffic["gradient all-reduce"] == (0, 0)  # FSDP covers every axis holding rows or positions


def test_plan_counts_only_slice_crossing_collectives_as_dcn(capsys):
    """Two slices of the 128K config's 64 devices (dcn_data=2): each slice keeps its fsdp × context
    grid; the only DCN traffic is the gradient all-reduce between the two replicas, 2 × (2 - 1)/2 × the
    device's gradient shard, once per step."""
    assert plan_cli([str(LONG_CONTEXT), "devices=128", "mesh.dcn_data=2", "global_batch_size=64"]) == 0
    out = capsys.readouterr().out
    assert "mesh: dcn_data=2 × data=1 × fsdp=8 × context=8 × tensor=1 (128 devices)" in out
    traffic = {line[:42].strip(): tuple(map(float, line[42:].split()))
               for line in out.split("traffic per device per step")[1].splitlines()[1:]}
    params = hand_counted_8b_128k()["parameters"]
    assert traffic["gradient all-reduce"] == pytest.approx((params / GIB, 0), abs=6e-4)
    assert traffic["FSDP gathers and reduce-scatters"][0] == 0 and traffic["context attention"][0] == 0
    assert traffic["total"][0] == pytest.approx(params / GIB, abs=6e-4)
