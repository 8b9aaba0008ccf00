"""Context parallelism: a sequence split over devices gives one device's loss and gradients.

The 8-device work runs in ONE subprocess (this file run as a script, as tests/test_sharding.py does).
Oracle: the same loss function (`training.step.batch_nll`: chunked loss, packed documents, GQA, causal)
and its gradients jitted on one device with the `xla` reference attention. Each mesh with a `context`
axis must reproduce the loss and every parameter's gradient within 1e-5 of its largest magnitude (fp32,
highest matmul precision), with the reference attention (all-gather form) and with the Pallas GPU kernel
in interpret mode (all-to-all form); and the lowered program must hold that form's collective, so a
run that silently fell back to one device's attention cannot pass.

Load balancing is checked on the layout the attention uses (`parallel.context.balanced_order`); the
control is the contiguous layout, whose last device computes several times the first's blocks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_jax.parallel.context import (balanced_order, from_balanced, to_balanced,
                                        visible_blocks_per_shard)

ROOT = Path(__file__).resolve().parent.parent
MESHES = {  # name: MeshConfig keywords
    "context=4": dict(fsdp=2, context=4, strategy="fsdp"),
    "context=2xfsdp=2xtensor=2": dict(fsdp=2, context=2, tensor=2, strategy="fsdp+tp"),
}
IMPLS = {"xla": "all-gather", "pallas_gpu": "all-to-all"}  # attention_impl -> the form it must take
COLLECTIVE = {"all-gather": "all_gather", "all-to-all": "all_to_all"}
RTOL = 1e-5
MODEL = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=32, dtype="float32",
             attention_impl="xla", max_seq_len=32, loss_chunk_size=8)
ROWS, LENGTH = 2, 32


def make_batch(seed: int) -> dict:
    """Packed rows: three documents per row at different cuts, some padding at the end, masked targets."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL["vocab_size"], (ROWS, LENGTH + 1)).astype(np.int32)
    idx = np.arange(LENGTH)
    segment_ids = np.zeros((ROWS, LENGTH), np.int32)
    positions = np.zeros((ROWS, LENGTH), np.int32)
    for row in range(ROWS):
        cuts = sorted(rng.choice(np.arange(3, LENGTH - 4), 2, replace=False)) + [LENGTH - 2]
        start = 0
        for doc, end in enumerate(cuts, 1):
            segment_ids[row, start:end] = doc
            positions[row, start:end] = idx[start:end] - start
            start = end
    loss_mask = ((rng.random((ROWS, LENGTH)) > 0.2) & (segment_ids > 0)).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": positions, "loss_mask": loss_mask}


def worker() -> dict:
    """Runs with 8 CPU devices: every mesh and attention form against the single-device oracle."""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_default_matmul_precision", "highest")

    from llama_jax.model.api import init_params, param_shardings
    from llama_jax.model.config import ModelConfig
    from llama_jax.parallel.mesh import MeshConfig, batch_sharding, make_mesh, under
    from llama_jax.parallel.rules import rules_for
    from llama_jax.training.step import batch_nll

    assert jax.device_count() == 8
    cfg = ModelConfig(**MODEL)
    params, batch = init_params(cfg, seed=3), make_batch(1)
    loss_and_grad = lambda c: jax.value_and_grad(lambda p, b: batch_nll(c, p, b)[0])  # noqa: E731
    ref_loss, ref_grads = jax.jit(loss_and_grad(cfg))(params, batch)

    results = {}
    for mesh_name, mesh_kw in MESHES.items():
        mesh_cfg = MeshConfig(**mesh_kw)
        mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg.strategy)
        for impl, form in IMPLS.items():
            c = cfg.replace(attention_impl=impl)
            fn = jax.jit(loss_and_grad(c), in_shardings=(param_shardings(c, mesh, rules), batch_sharding(mesh, rules)))
            sharded = under(mesh, rules, fn)
            jaxpr = str(under(mesh, rules, jax.make_jaxpr(loss_and_grad(c)))(params, batch))
            loss, grads = sharded(params, batch)
            errs = {jax.tree_util.keystr(path): float(np.max(np.abs(np.asarray(g) - np.asarray(r)))
                                                      / max(float(np.max(np.abs(np.asarray(r)))), 1e-30))
                    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads))}
            results[f"{mesh_name}/{impl}"] = {
                "loss_err": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                "grad_errs": errs,
                "collective": COLLECTIVE[form] in jaxpr,
                "kernel": "pallas_call" in jaxpr,
                "mesh_shape": dict(mesh.shape),
            }
    # Decoding with a KV cache under a context-split mesh: a clear error, not a wrong layout.
    from llama_jax.model.transformer import apply
    from llama_jax.model.transformer import KVCache
    mesh_cfg = MeshConfig(**MESHES["context=4"])
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg.strategy)
    try:
        under(mesh, rules, jax.jit(lambda p, t: apply(cfg, p, t, cache=KVCache.create(cfg, ROWS, LENGTH))))(
            params, batch["inputs"])
        results["cache_error"] = None
    except ValueError as err:
        results["cache_error"] = str(err)
    return results


def worker_env() -> dict:
    xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags}


@pytest.fixture(scope="module")
def results() -> dict:
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600, env=worker_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.xdist_group("context_parallel_worker")
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_context_parallel_loss_and_every_gradient_equal_one_device(results, mesh, impl):
    r = results[f"{mesh}/{impl}"]
    assert r["mesh_shape"]["context"] > 1
    assert r["collective"], f"the {IMPLS[impl]} form was not taken"
    assert r["kernel"] == (impl != "xla")
    assert r["loss_err"] <= RTOL
    bad = {path: err for path, err in r["grad_errs"].items() if err > RTOL}
    assert not bad, bad
    assert len(r["grad_errs"]) == 12  # every parameter: embedding, output, final norm, 9 layer tensors


@pytest.mark.slow
@pytest.mark.xdist_group("context_parallel_worker")
def test_decoding_with_a_cache_under_context_parallelism_is_refused(results):
    assert results["cache_error"] and "decoding with a KV cache cannot split sequences" in results["cache_error"]


def test_balanced_layout_round_trips_and_holds_mirrored_chunks():
    x = np.arange(2 * 48).reshape(2, 48)
    assert (from_balanced(to_balanced(x, 4), 4) == x).all()
    order = balanced_order(16, 4)  # 8 chunks of 2: device c holds chunks c and 7 - c
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="multiple of 2 × 4 = 8"):
        balanced_order(12, 4)


@pytest.mark.parametrize("length,shards,block", [(64, 4, 4), (256, 4, 8), (96, 2, 8), (512, 8, 16)])
def test_every_device_computes_the_same_number_of_blocks_within_one(length, shards, block):
    counts = visible_blocks_per_shard(balanced_order(length, shards), shards, block)
    assert max(counts) - min(counts) <= 1, counts
    # control: the contiguous split is lopsided (the last device does 2·shards - 1 times the first's)
    contiguous = visible_blocks_per_shard(np.arange(length), shards, block)
    assert max(contiguous) - min(contiguous) > 1, contiguous


if __name__ == "__main__":
    print(json.dumps(worker()))
