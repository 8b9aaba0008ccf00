"""Sharded evaluation across two hosts equals evaluation on one device.

Two processes with two CPU devices each (this file run as a script, joined by jax.distributed on
localhost) form a data=2 × tensor=2 mesh with the fsdp+tp rules: batch rows split across the hosts,
vocabulary, heads and MLP split over `tensor`. Every process checks that per-token scores (padded,
multi-batch, strided) and greedy generation of a left-padded batch equal its own single-device results.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses with several (simulated) devices or processes

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


def worker(port: int, process_id: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import numpy as np

    from llama_jax.model.config import ModelConfig
    from llama_jax.evaluation.generate import Generator, SamplingConfig
    from llama_jax.evaluation.loading import place_model
    from llama_jax.evaluation.perplexity import token_logprobs
    from llama_jax.evaluation.scoring import TokenScorer
    from llama_jax.parallel.mesh import MeshConfig
    from llama_jax.model.api import init_params

    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                      dtype="float32", attention_impl="xla", max_seq_len=32)
    params = jax.tree.map(np.asarray, init_params(cfg, seed=1))
    single = place_model(cfg, params, dtype="fp32")
    sharded = place_model(cfg, params, dtype="fp32",
                          mesh_cfg=MeshConfig(data=2, fsdp=1, tensor=2, strategy="fsdp+tp"))
    assert sharded.mesh.devices.size == 4 and sharded.row_multiple == 2
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 96, n) for n in (5, 30, 70, 2)]
    ref, got = (token_logprobs(TokenScorer(m, batch_size=3), docs, context_len=32, stride=12)
                for m in (single, sharded))
    score_err = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, got))
    prompts = [rng.integers(3, 96, n).tolist() for n in (4, 9, 1)]
    sampling = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
    same_tokens = Generator(single, sampling, pad_id=0)(prompts).tokens == \
        Generator(sharded, sampling, pad_id=0)(prompts).tokens
    print(json.dumps({"process": process_id, "score_err": score_err, "same_tokens": same_tokens}), flush=True)


def test_two_hosts_match_one_device():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags}
    procs = [subprocess.Popen([sys.executable, __file__, str(port), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-5000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["score_err"] <= TOL and result["same_tokens"], result


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]))
