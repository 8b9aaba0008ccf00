"""The training loop on a mesh and across processes, fed by the real data iterator from a corpus on disk.

Every run here is `llama_jax.training.loop.train` (what `train.py` runs) in a child process that runs this
file as a script with its own simulated CPU devices; several processes join through jax.distributed on
localhost (test_multihost.py's launching, ports and reaping). The oracle is one uninterrupted run of the
same config in the pytest process on its single device, with one batch per step (micro_batches=1):

- micro-batches: 1 process × 4 devices (data=2 × fsdp=2) with micro_batches=2 has its per-step losses and
  final parameters;
- multi-host: 2 processes × 2 devices (fsdp=4: each process holds half of every parameter) are killed
  (SIGKILL, mid-run: step 3 done, step 2's checkpoint on disk, every process having written its shards),
  resume on 2 new processes to step 4, then on 1 process × 4 devices (data=2 × fsdp=2, another mesh and
  process count) to step 6: the per-step losses (metrics.jsonl, across the kill) and the final parameters
  are the oracle's, and each process's iterator yielded exactly its block of rows of every global batch of
  a single-process iterator.

Tolerances (fp32, highest matmul precision; sharded sums and micro-batch accumulation change only the order
of additions): losses within 1e-5 relative, each parameter array within 1e-5 of its largest magnitude.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_multihost import free_port
from test_train import child_env, losses_from_jsonl, overrides, persistent_compilation_cache, prepare, run_in_process

pytestmark = pytest.mark.slow  # subprocesses with several (simulated) devices or processes

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
RTOL = 1e-5
STEPS = 6  # of the oracle; the schedule is that of `steps` (30), so any prefix of steps is comparable
ROWS = 8  # global batch: one row per device and micro-batch with 4 devices and micro_batches=2


def worker(spec: dict) -> dict:
    """One process of a job: `spec` = {devices, process_id, num_processes, port, runs, kill}. Calls `train`
    once per override list of `runs`, in order (a later call resumes from the checkpoint an earlier one left),
    with the iterator's `__next__` recording every batch it yields: (global batch number, inputs). With
    `kill` = {before_batch, once_saved, record}, the process SIGKILLs itself when asked for that global
    batch, once the file `once_saved` exists (a step's integrity record: its save is complete), after
    writing what it yielded to `record`.<process_id>."""
    import jax
    jax.config.update("jax_num_cpu_devices", spec["devices"])
    from llama_jax.data.pipeline import TrainIterator
    from llama_jax.training.config import load_train_config
    from llama_jax.training.loop import train

    yielded = []
    real_next = TrainIterator.__next__

    def recording_next(self):
        number = self.get_state()["batch"]
        kill = spec.get("kill")
        if kill and number == kill["before_batch"]:
            Path(f"{kill['record']}.{spec['process_id']}").write_text(json.dumps(yielded))
            while not Path(kill["once_saved"]).is_file():  # the step's integrity record: the save is complete
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        batch = real_next(self)
        yielded.append([number, batch["inputs"].tolist()])
        return batch

    TrainIterator.__next__ = recording_next
    distributed = ({"distributed.mode": "off"} if spec["num_processes"] == 1 else
                   {"distributed.mode": "on", "distributed.coordinator_address": f"127.0.0.1:{spec['port']}",
                    "distributed.num_processes": spec["num_processes"], "distributed.process_id": spec["process_id"],
                    "distributed.initialization_timeout_s": 60})
    runs = []
    for args in spec["runs"]:
        yielded.clear()
        result = train(load_train_config(None, args + [f"{k}={v}" for k, v in distributed.items()]))
        runs.append({"first_step": result.first_step, "losses": result.losses, "status": result.status,
                     "yielded": list(yielded)})
    assert jax.process_count() == spec["num_processes"] and jax.device_count() == 4
    return {"process_index": jax.process_index(), "runs": runs}


def launch(spec: dict, cache_env: dict) -> subprocess.Popen:
    env = {**child_env(), **cache_env, "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"}
    return subprocess.Popen([sys.executable, __file__, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def run_job(num_processes: int, cache_env: dict, *runs: list[str], kill: dict | None = None) -> list[list[dict]]:
    """One job of `num_processes` processes (4 devices in all) calling `train` once per override list of
    `runs`: [process][run] results ([process][0]["yielded"] only, read from its record, when the job is to
    `kill` itself). On any other failure or timeout every process is killed and reaped."""
    port = free_port() if num_processes > 1 else 0
    procs = [launch({"devices": 4 // num_processes, "process_id": i, "num_processes": num_processes,
                     "port": port, "runs": runs, "kill": kill}, cache_env) for i in range(num_processes)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        outputs = [p.communicate(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
        want = -signal.SIGKILL if kill else 0
        for p, (out, err) in zip(procs, outputs):
            assert p.returncode == want, f"process exited with {p.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
        if kill:
            return [[{"yielded": json.loads(Path(f"{kill['record']}.{i}").read_text())}] for i in range(num_processes)]
        results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [r["process_index"] for r in results] == list(range(num_processes))
    return [r["runs"] for r in results]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """This process and the children share the on-disk compilation cache of test_train.py's modules."""
    directory = tmp_path_factory.getbasetemp() / "jax_cache"
    for _ in persistent_compilation_cache(directory):
        yield {"JAX_COMPILATION_CACHE_DIR": str(directory)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("multihost_corpus"))


# A given peak FLOP/s spares every invocation the CPU matmul benchmark behind its MFU metric.
RUN = dict(global_batch_size=ROWS, checkpoint_every=2, peak_flops_per_device=1e12)


def run_args(corpus, run_dir: Path, **extra) -> list[str]:
    """A tiny fp32 run of `ROWS` rows per step on the prepared corpus, checkpointing every 2 steps."""
    return overrides(corpus, run_dir, **RUN, **extra)


@pytest.fixture(scope="module")
def oracle(corpus, cache_env, tmp_path_factory):
    """The uninterrupted run on this process's single device, one batch per step: (losses, final params,
    the single-process iterator's first STEPS global batches' inputs)."""
    from llama_jax.data import make_train_iterator
    from llama_jax.data.tokenizer import load_tokenizer
    from llama_jax.training.config import load_train_config

    run_dir = tmp_path_factory.mktemp("oracle") / "run"
    result = run_in_process(corpus, run_dir, **RUN, stop_at_step=STEPS)
    assert (result.first_step, result.last_step) == (1, STEPS)
    cfg = load_train_config(None, run_args(corpus, run_dir))
    data = make_train_iterator(cfg.data, load_tokenizer(corpus["tokenizer"]), seq_len=cfg.seq_len,
                               global_batch_size=ROWS)
    batches = [next(data)["inputs"] for _ in range(STEPS)]
    return result.losses, final_params(run_dir), batches


def final_params(run_dir: Path) -> dict:
    from llama_jax.checkpoint.params import load_params
    from llama_jax.training.config import load_train_config

    return load_params(run_dir, load_train_config(run_dir / "config.yaml").model)


def assert_params_close(got: dict, want: dict) -> None:
    """Each array within RTOL of its largest magnitude (the optimizer moved every parameter)."""
    import jax

    flat_got, flat_want = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, a), (_, b) in zip(flat_got, flat_want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err <= RTOL, (jax.tree_util.keystr(path), err)


def test_micro_batches_on_a_mesh_match_one_large_batch_on_one_device(corpus, cache_env, oracle, tmp_path):
    """micro_batches=2 on data=2 × fsdp=2 (4 devices, one process): the oracle's losses and parameters."""
    losses, params, _ = oracle
    run_dir = tmp_path / "run"
    ((result,),) = run_job(1, cache_env, run_args(corpus, run_dir, stop_at_step=STEPS, micro_batches=2,
                                                  **{"mesh.data": 2, "mesh.fsdp": 2}))
    assert result["status"] == "stopped" and result["first_step"] == 1
    assert result["losses"] == pytest.approx(losses, rel=RTOL)
    assert losses[-1] < losses[0] - 0.5  # the steps really trained
    assert_params_close(final_params(run_dir), params)


def test_two_processes_killed_resume_on_two_processes_then_on_another_mesh(corpus, cache_env, oracle, tmp_path):
    """2 processes × 2 devices (fsdp=4 across them) are SIGKILLed after step 3 (step 2's checkpoint complete,
    each process having written its shards); 2 new processes resume to step 4 and exit; 1 process × 4
    devices resumes with data=2 × fsdp=2 to step 6. The oracle's per-step losses and final parameters;
    every process read exactly its rows of each global batch of a single-process iterator."""
    losses, params, batches = oracle
    run_dir = tmp_path / "run"
    killed = run_job(2, cache_env, run_args(corpus, run_dir, **{"mesh.fsdp": 4}),
                     kill={"before_batch": 3, "once_saved": str(run_dir / "checkpoint_integrity" / "2.json"),
                           "record": str(tmp_path / "yielded")})
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    resumed = run_job(2, cache_env, run_args(corpus, run_dir, stop_at_step=4, **{"mesh.fsdp": 4}))
    for step in (2, 4):  # each process wrote its own shards (orbax: one OCDBT store per process)
        for item in ("params", "opt_state"):
            for p in (0, 1):
                written = (run_dir / "checkpoints" / str(step) / item / f"ocdbt.process_{p}" / "d").iterdir()
                assert sum(f.stat().st_size for f in written) > 0, (step, item, p)
    ((other_mesh,),) = run_job(1, cache_env, run_args(corpus, run_dir, stop_at_step=6,
                                                      **{"mesh.data": 2, "mesh.fsdp": 2}))

    half = ROWS // 2
    for job, numbers in ((killed, [0, 1, 2]), (resumed, [2, 3])):
        for p, runs in enumerate(job):  # process p yielded rows [p*4, (p+1)*4) of each global batch, nothing else
            assert [b for b, _ in runs[0]["yielded"]] == numbers
            for b, inputs in runs[0]["yielded"]:
                np.testing.assert_array_equal(inputs, batches[b][p * half:(p + 1) * half])
        for b, first, second in zip(numbers, job[0][0]["yielded"], job[1][0]["yielded"]):  # together: all
            np.testing.assert_array_equal(np.concatenate([first[1], second[1]]), batches[b])
    assert [b for b, _ in other_mesh["yielded"]] == [4, 5]
    for b, inputs in other_mesh["yielded"]:
        np.testing.assert_array_equal(inputs, batches[b])

    assert [runs[0]["first_step"] for runs in resumed] == [3, 3] and other_mesh["first_step"] == 5
    assert resumed[0][0]["losses"] == resumed[1][0]["losses"]  # metrics are replicated
    assert resumed[0][0]["losses"] + other_mesh["losses"] == pytest.approx(losses[2:], rel=RTOL)
    logged = losses_from_jsonl(run_dir)  # steps 1-2 of the killed job, 3-4 resumed, 5-6 on the other mesh
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert [logged[s] for s in sorted(logged)] == pytest.approx(losses, rel=RTOL)
    assert_params_close(final_params(run_dir), params)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
