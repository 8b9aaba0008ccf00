"""Two OS processes × 4 CPU devices (jax.distributed on localhost, gloo collectives) train like one × 8.

Each process runs this file as a script, joins through `llama_jax.parallel.distributed.initialize`, builds the
same data=2 × fsdp=2 × tensor=2 mesh, feeds only its own rows (`process_rows` + `make_global_batch`) and
runs three steps. The oracle is one process with 8 devices running the same program on the whole batch.
The processes are always killed and reaped, even when the test fails or times out.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses with several (simulated) devices or processes

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
STEPS = 3
ROWS, LENGTH = 8, 16
MODEL = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64, dtype="float32",
             attention_impl="xla", max_seq_len=32)


def worker(process_id: int, num_processes: int, port: int) -> dict:
    import jax
    jax.config.update("jax_num_cpu_devices", 8 // num_processes)
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np

    from llama_jax.model.config import ModelConfig
    from llama_jax.parallel.distributed import DistributedConfig, initialize, is_main_process
    from llama_jax.parallel.mesh import MeshConfig, make_global_batch, make_mesh, process_rows
    from llama_jax.training.step import create_train_state, jit_train_step, OptimizerConfig, make_optimizer
    from llama_jax.parallel.rules import rules_for

    mode = "on" if num_processes > 1 else "off"
    joined = initialize(DistributedConfig(mode=mode, coordinator_address=f"127.0.0.1:{port}" if port else None,
                                          num_processes=num_processes, process_id=process_id,
                                          initialization_timeout_s=60))
    assert joined == (num_processes > 1) and jax.process_count() == num_processes and jax.device_count() == 8
    assert is_main_process() == (process_id == 0)

    cfg = ModelConfig(**MODEL)
    optimizer = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=1), total_steps=STEPS)
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2, strategy="fsdp+tp")
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg.strategy)
    state = create_train_state(cfg, optimizer, mesh, rules, seed=5)
    step = jit_train_step(cfg, optimizer, mesh, rules)
    rows = process_rows(mesh, ROWS, rules)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        tokens = rng.integers(0, cfg.vocab_size, (ROWS, LENGTH + 1)).astype(np.int32)
        mask = (rng.random((ROWS, LENGTH)) > 0.2).astype(np.float32)
        local = {"inputs": tokens[rows, :-1], "targets": tokens[rows, 1:], "loss_mask": mask[rows]}
        state, metrics = step(state, make_global_batch(local, mesh, rules))
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "rows": [rows.start, rows.stop], "process_index": jax.process_index()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(process_id: int, num_processes: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"}
    return subprocess.Popen([sys.executable, __file__, str(process_id), str(num_processes), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def collect(procs: list[subprocess.Popen]) -> list[dict]:
    """Wait for every process (shared deadline); on any failure or timeout kill all of them."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        outputs = [p.communicate(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
        for p, (out, err) in zip(procs, outputs):
            assert p.returncode == 0, f"process exited with {p.returncode}:\n{err[-4000:]}"
        return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_two_processes_match_one_process_with_eight_devices():
    port = free_port()
    procs = [launch(0, 1, 0), launch(0, 2, port), launch(1, 2, port)]
    single, host0, host1 = collect(procs)
    assert single["rows"] == [0, ROWS]
    assert (host0["process_index"], host0["rows"]) == (0, [0, ROWS // 2])
    assert (host1["process_index"], host1["rows"]) == (1, [ROWS // 2, ROWS])
    for host in (host0, host1):
        assert len(host["losses"]) == STEPS
        for got, want in zip(host["losses"], single["losses"]):
            assert abs(got - want) <= 1e-5 * abs(want), (host["losses"], single["losses"])
    assert single["losses"][-1] < single["losses"][0]  # the steps really trained


if __name__ == "__main__":
    print(json.dumps(worker(*map(int, sys.argv[1:4]))))
