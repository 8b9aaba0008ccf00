"""Sharded training equals single-device training on 8 simulated CPU devices, and FSDP really splits memory.

The 8-device work runs in ONE subprocess (this file run as a script), so the pytest process keeps its
single device and every mesh is compiled once. The oracle is the unsharded `train_step` jitted on one
device; each mesh must reproduce its loss, gradients, parameters and optimizer state after two AdamW
steps within 1e-5 of the largest magnitude of each array (fp32, highest matmul precision). The Pallas
attention kernel, run per shard in shard_map under a 3-axis mesh, must reproduce the reference eval sums.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Subprocesses with several (simulated) devices; every test reads one module-scoped worker's results, so
# they share an xdist group (pyproject: --dist loadgroup) and the worker runs once, not once per xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sharding_worker")]

ROOT = Path(__file__).resolve().parent.parent
MESHES = {
    "dp=8": dict(data=8, fsdp=1, strategy="dp"),
    "fsdp=8": dict(data=1, fsdp=8, strategy="fsdp"),
    "fsdp=4xtensor=2": dict(data=1, fsdp=4, tensor=2, strategy="fsdp+tp"),
    "data=2xfsdp=2xtensor=2": dict(data=2, fsdp=2, tensor=2, strategy="fsdp+tp"),
}
KERNEL_MESH, KERNEL_IMPL = "data=2xfsdp=2xtensor=2", "pallas_gpu"  # interpret mode on CPU
RTOL = 1e-5
MODEL = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64, dtype="float32",
             attention_impl="xla", max_seq_len=32)
ROWS, LENGTH = 8, 16


def _optimizer_config():
    from llama_jax.training.step import OptimizerConfig
    return OptimizerConfig(peak_lr=1e-3, warmup_steps=1)


def make_batch(seed: int) -> dict:
    """Packed rows: two documents per row (segment ids, restarting positions), some masked targets."""
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL["vocab_size"], (ROWS, LENGTH + 1)).astype(np.int32)
    cut = rng.integers(3, LENGTH - 3, ROWS)
    idx = np.arange(LENGTH)[None, :]
    second = idx >= cut[:, None]
    segment_ids = np.where(second, 2, 1).astype(np.int32)
    positions = np.where(second, idx - cut[:, None], idx).astype(np.int32)
    loss_mask = (rng.random((ROWS, LENGTH)) > 0.2).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": positions, "loss_mask": loss_mask}


def max_rel_err(a, b) -> float:
    """max |a - b| / max |b| over one array (0 for two all-zero arrays)."""
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b)) if b.size else 0.0
    diff = np.max(np.abs(a - b)) if b.size else 0.0
    return float(diff / scale) if scale else float(diff)


def tree_err(a, b) -> float:
    import jax
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(max_rel_err(x, y) for x, y in zip(la, lb))


def worker() -> dict:
    """Runs with 8 CPU devices: every mesh against the single-device oracle."""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_default_matmul_precision", "highest")
    import optax

    from llama_jax.model.config import ModelConfig
    from llama_jax.parallel.mesh import MeshConfig, activate, make_global_batch, make_mesh
    from llama_jax.training.step import (create_train_state, jit_eval_step, jit_train_step, train_state_shardings,
                                         eval_step, init_train_state, train_step, make_optimizer)
    from llama_jax.model.api import param_shardings
    from llama_jax.parallel.rules import rules_for
    from llama_jax.model.api import init_params

    assert jax.device_count() == 8
    cfg = ModelConfig(**MODEL)
    optimizer = make_optimizer(_optimizer_config(), total_steps=4)
    batches = [make_batch(1), make_batch(2)]

    def first_moment(state):
        """AdamW's first moment after one step is (1 - b1)·(clipped gradient): the gradients, compared."""
        return jax.device_get(optax.tree.get(state.opt_state, "mu"))

    # The oracle: the same functions jitted with no sharding at all, on device 0.
    ref_states = [jax.jit(lambda: init_train_state(init_params(cfg, seed=3), optimizer))()]
    ref_step = jax.jit(lambda s, b: train_step(s, b, model_cfg=cfg, optimizer=optimizer))
    ref_losses = []
    for batch in batches:
        state, metrics = ref_step(ref_states[-1], batch)
        ref_states.append(state)
        ref_losses.append(float(metrics["loss"]))
    ref_eval = jax.jit(lambda p, b: eval_step(p, b, model_cfg=cfg))(ref_states[-1].params, batches[0])

    results = {}
    for name, mesh_kw in MESHES.items():
        mesh_cfg = MeshConfig(**mesh_kw)
        mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg.strategy)
        state = create_train_state(cfg, optimizer, mesh, rules, seed=3)
        init_err = tree_err(state, ref_states[0])
        step = jit_train_step(cfg, optimizer, mesh, rules)
        losses = []
        for i, batch in enumerate(batches):
            state, metrics = step(state, make_global_batch(batch, mesh, rules))
            losses.append(float(metrics["loss"]))
            if i == 0:  # before the next step donates these buffers
                grad_err = tree_err(first_moment(state), first_moment(ref_states[1]))
        evaluated = jit_eval_step(cfg, mesh, rules)(state.params, make_global_batch(batches[0], mesh, rules))
        expected = train_state_shardings(cfg, optimizer, mesh, rules)
        wrong_sharding = [jax.tree_util.keystr(path) for (path, leaf), sharding in zip(
            jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(expected))
            if not leaf.sharding.is_equivalent_to(sharding, leaf.ndim)]
        results[name] = {
            "init_err": init_err,
            "loss_errs": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)],
            "grad_err": grad_err,
            "params_err": tree_err(state.params, ref_states[-1].params),
            "opt_state_err": tree_err(state.opt_state, ref_states[-1].opt_state),
            "eval_err": tree_err(evaluated, ref_eval),
            "wrong_sharding": wrong_sharding,
            "bytes": state_bytes(state),
            "mesh_shape": dict(mesh.shape),
        }

    # The Pallas kernel (interpret mode) in the sharded eval step: traced inside shard_map, same sums.
    mesh_cfg = MeshConfig(**MESHES[KERNEL_MESH])
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg.strategy)
    kernel_cfg = cfg.replace(attention_impl=KERNEL_IMPL)
    params = jax.device_put(ref_states[-1].params, param_shardings(kernel_cfg, mesh, rules))
    batch = make_global_batch(batches[0], mesh, rules)
    with activate(mesh, rules):
        jaxpr = str(jax.make_jaxpr(lambda p, b: eval_step(p, b, model_cfg=kernel_cfg))(params, batch))
    results["kernel"] = {"in_shard_map": "shard_map" in jaxpr and "pallas_call" in jaxpr,
                         "eval_err": tree_err(jit_eval_step(kernel_cfg, mesh, rules)(params, batch), ref_eval)}
    return results


def state_bytes(state) -> dict:
    """Bytes actually held by each device (summed over the live arrays' shards), and the reference sizes."""
    import jax
    per_device = collections.Counter()
    total = replicated_allowance = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
        total += leaf.nbytes
        if leaf.ndim == 0 or "norm" in jax.tree_util.keystr(path):
            replicated_allowance += leaf.nbytes
    return {"per_device": sorted(per_device.values()), "total": total, "replicated_allowance": replicated_allowance}


def worker_env() -> dict:
    """The environment of the 8-device child processes (XLA's warnings go to their stderr)."""
    # LLVM optimisation level 0: the same numerics at a fraction of the compile time (tiny shapes).
    xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags}


def involuntary_remat(stderr: str) -> bool:
    """Whether XLA's SPMD partitioner logged that it could not reshard a tensor and replicated it whole on
    every device instead."""
    return "Involuntary full rematerialization" in stderr


# The positive control of that check: a 1-D array split 4 ways, reshaped to (6, 8) split by columns, is a
# resharding the partitioner cannot do in place (it replicates, and says so).
REMAT_CONTROL = """
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
jax.config.update("jax_num_cpu_devices", 8)
mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
split = lambda x, *spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
jax.jit(lambda x: split(split(x, "b").reshape(6, 8), None, "b")).lower(jnp.ones(48)).compile()
"""


@pytest.fixture(scope="module")
def worker_run() -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, env=worker_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def results(worker_run) -> dict:
    return json.loads(worker_run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", list(MESHES))
def test_mesh_matches_single_device(results, mesh):
    r = results[mesh]
    assert r["wrong_sharding"] == []
    assert r["init_err"] == 0.0, "sharded init must create the very same random weights"
    assert max(r["loss_errs"]) <= RTOL
    assert r["grad_err"] <= RTOL
    assert r["params_err"] <= RTOL
    assert r["opt_state_err"] <= RTOL
    assert r["eval_err"] <= RTOL


def test_no_mesh_falls_back_to_replicating_a_tensor(worker_run):
    """XLA's SPMD partitioner logs this when it cannot reshard a tensor and replicates it whole on every
    device instead (the embedding lookup under fsdp+tp did, before the table's shards were gathered)."""
    assert not involuntary_remat(worker_run.stderr)


def test_the_remat_check_sees_the_warning_when_xla_logs_it():
    """Positive control: the check above would also pass if XLA's warnings were silenced or reworded; a
    child with the worker's environment that does force a full rematerialization must be caught by it."""
    proc = subprocess.run([sys.executable, "-c", REMAT_CONTROL], capture_output=True, text=True, timeout=120,
                          env=worker_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert involuntary_remat(proc.stderr), proc.stderr[-3000:]


def test_attention_kernel_runs_per_shard_in_shard_map(results):
    """`attention_impl=pallas_gpu` under data=2 × fsdp=2 × tensor=2: same eval sums as one device with `xla`."""
    assert results["kernel"]["in_shard_map"]
    assert results["kernel"]["eval_err"] <= RTOL


def test_fsdp_splits_params_and_optimizer_state(results):
    b = results["fsdp=8"]["bytes"]
    assert len(b["per_device"]) == 8
    assert max(b["per_device"]) <= b["total"] / 8 + b["replicated_allowance"]
    # and it is a real saving: data parallelism holds everything on every device
    dp = results["dp=8"]["bytes"]
    assert min(dp["per_device"]) == dp["total"]
    assert max(b["per_device"]) < dp["total"] / 4


def test_plan_matches_measured_bytes(results):
    """The `plan` arithmetic (no devices, no weights) predicts exactly what the live shards hold."""
    from llama_jax.model.config import ModelConfig
    from llama_jax.training.plan import state_bytes_per_device
    from llama_jax.parallel.rules import rules_for
    from llama_jax.training.step import make_optimizer

    optimizer = make_optimizer(_optimizer_config(), total_steps=4)
    for name, mesh_kw in MESHES.items():
        planned = state_bytes_per_device(ModelConfig(**MODEL), optimizer, rules_for(mesh_kw["strategy"]),
                                         results[name]["mesh_shape"])
        measured = results[name]["bytes"]["per_device"]
        step_counter = 4  # the int32 TrainState.step
        assert set(measured) == {planned["params"] + planned["optimizer"] + step_counter}, name


if __name__ == "__main__":
    print(json.dumps(worker()))
