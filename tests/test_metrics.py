"""FLOPs per token against a hand count; the CPU's MFU peak is a measurement, not a constant."""
from __future__ import annotations

import time

import jax
import numpy as np

from llama_jax.model.config import ModelConfig
from llama_jax.training.metrics import flops_per_token, measured_matmul_peak, peak_flops


def test_flops_per_token_counts_every_matmul_parameter_and_attention():
    cfg = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                      max_seq_len=32, tie_embeddings=False)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96  # wq, wo; wk, wv (2 kv heads × 16); w1, w2, w3
    matmul_params = 2 * per_layer + 64 * 100  # + output projection; the embedding lookup is not a matmul
    assert flops_per_token(cfg, 32) == 6 * matmul_params + 12 * 2 * 64 * 32
    tied = cfg.replace(tie_embeddings=True)  # the shared table is counted once, as the projection
    assert flops_per_token(tied, 32) == 6 * matmul_params + 12 * 2 * 64 * 32


def test_cpu_peak_is_measured_once_and_agrees_with_numpy():
    cpu = jax.devices("cpu")[0]
    peak = peak_flops(cpu, "float32")
    assert peak == measured_matmul_peak("float32")  # cached: one measurement per process and dtype
    a = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)
    a @ a
    start = time.perf_counter()
    a @ a
    numpy_rate = 2 * 2048**3 / (time.perf_counter() - start)
    assert numpy_rate / 4 < peak < numpy_rate * 4, (peak, numpy_rate)
