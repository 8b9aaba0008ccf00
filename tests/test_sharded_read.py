"""Checkpoints read straight into their shards: each of two hosts holds only its half, in every format.

Two processes × 4 CPU devices (this file run as a script, jax.distributed on localhost), mesh fsdp=8,
a 213 MB fp32 model written as a params dir (orbax), a Meta directory and a Hugging Face directory.
Oracles: each process's peak RSS while loading (Linux VmHWM, reset just before) grows by at most
1.2 × (its half of the model + the largest checkpoint tensor); reading the whole model first, as
evaluation did, needs at least the whole model (213 MB) plus the process's half (106 MB) — above that
bound (the control below checks the arithmetic). The logits of the loaded model equal those of a
single-process, in-memory load (`read_checkpoint`) within 1e-5 of their largest magnitude (fp32; the
sharded products sum in another order).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(vocab_size=32000, dim=512, n_layers=6, n_heads=8, n_kv_heads=4, ffn_hidden_dim=1536, max_seq_len=64,
             dtype="float32", attention_impl="xla")
TOKENS = np.arange(2 * 16, dtype=np.int32).reshape(2, 16) * 997 % MODEL["vocab_size"]
SLACK = 1.2
TOL = 1e-5


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(port: int, process_id: int, processes: int, path: str, out: str) -> None:
    """One of `processes` processes sharing 8 CPU devices (fsdp=8): load `path` into its shards, print its
    peak RSS growth while loading; process 0 saves the logits of TOKENS to `out` (bench/load.py runs it too)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8 // processes)
    jax.config.update("jax_default_matmul_precision", "highest")
    if processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes,
                                   process_id=process_id)
    from llama_jax.convert.sharded_read import read_sharded
    from llama_jax.model import api, transformer
    from llama_jax.model.attention import resolve_attention
    from llama_jax.parallel.mesh import MeshConfig, activate, make_mesh, replicated
    from llama_jax.parallel.platform import platform_of
    from llama_jax.parallel.rules import rules_for

    mesh, rules = make_mesh(MeshConfig(fsdp=8, strategy="fsdp")), rules_for("fsdp")
    import orbax.checkpoint  # noqa: F401  (the readers' libraries: their code is not checkpoint memory)
    import torch  # noqa: F401
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = rss_bytes("VmRSS")
    cfg, params, _ = read_sharded(path, lambda cfg: api.param_shardings(cfg, mesh, rules), dtype="float32")
    growth = rss_bytes("VmHWM") - before
    cfg = resolve_attention(cfg, platform_of(mesh))  # as a program built for this mesh does
    with activate(mesh, rules):
        logits = jax.jit(lambda p, t: transformer.apply(cfg, p, t)[0], out_shardings=replicated(mesh))(params, TOKENS)
    if process_id == 0:
        np.save(out, np.asarray(logits))
    print(json.dumps({"growth": growth}), flush=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The same random weights as a params dir, a Meta directory and a Hugging Face directory."""
    from llama_jax.convert import convert
    from llama_jax.checkpoint.params import save_params
    from llama_jax.model.api import init_params
    from llama_jax.model.config import ModelConfig

    root = tmp_path_factory.mktemp("checkpoints")
    cfg = ModelConfig(**MODEL)
    save_params(root / "orbax", init_params(cfg, seed=0), cfg)
    for fmt in ("meta", "hf"):
        convert(root / "orbax", root / fmt, to=fmt, progress=False)
    return {"orbax": root / "orbax", "meta": root / "meta", "hf": root / "hf"}


def budget() -> tuple[int, int, int]:
    """(model bytes, largest checkpoint tensor, allowed peak growth of one of two processes)."""
    from llama_jax.model import api
    from llama_jax.model.config import ModelConfig

    shapes = api.flat_param_shapes(ModelConfig(**MODEL))
    per_layer = [s[1:] if p[0] == "layers" else s for p, s in shapes.items()]
    model = 4 * sum(int(np.prod(s)) for s in shapes.values())
    largest = 4 * max(int(np.prod(s)) for s in per_layer)
    return model, largest, int(SLACK * (model / 2 + largest))


def test_control_a_whole_model_read_exceeds_the_budget():
    model, largest, allowed = budget()
    assert model >= 200e6 and model + model / 2 > allowed, (model, largest, allowed)


FORMATS = ["meta", "hf", "orbax"]


@pytest.fixture(scope="module")
def two_host_load(request, checkpoints, tmp_path_factory) -> dict:
    """Each process's peak RSS growth while loading, and the logits process 0 computed, for one format."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("logits") / "logits.npy"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    path = checkpoints[request.param]
    procs = [subprocess.Popen([sys.executable, __file__, str(port), str(i), "2", str(path), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i in range(2)]
    growth = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-5000:]
        growth.append(next(json.loads(line) for line in stdout.splitlines() if line.startswith("{"))["growth"])
    return {"path": path, "growth": growth, "logits": np.load(out)}


@pytest.mark.parametrize("two_host_load", FORMATS, indirect=True)
def test_logits_equal_a_single_process_load(two_host_load):
    from llama_jax.convert import read_checkpoint
    from llama_jax.model import transformer
    from llama_jax.model.attention import resolve_attention

    cfg, params, _ = read_checkpoint(two_host_load["path"])  # one process, the whole model in memory
    cfg = resolve_attention(cfg.replace(dtype="float32"), "cpu")
    want = np.asarray(transformer.apply(cfg, params, TOKENS)[0])  # as the workers compute
    assert np.max(np.abs(two_host_load["logits"] - want)) <= TOL * np.max(np.abs(want))


@pytest.mark.parametrize("two_host_load", FORMATS, indirect=True)
def test_each_host_holds_its_half_plus_one_tensor(two_host_load):
    _, _, allowed = budget()
    assert all(0 < g <= allowed for g in two_host_load["growth"]), (two_host_load["growth"], allowed)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
