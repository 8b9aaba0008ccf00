"""Recovery across processes: SIGKILL during a save, SIGTERM (preemption), restore onto another mesh.

Each scenario runs `train.py` (or the trainer) in child processes, so kills, signals and 8 simulated
devices never touch the pytest process. Oracles: the killed process's own logged losses (the resumed run
must repeat them bitwise), and an uninterrupted run on one mesh for the resharded resume.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_jax.checkpoint.run import meta_path
from llama_jax.utils.config_io import ConfigError

from test_train import (ROOT, child_env, losses_from_jsonl, overrides, persistent_compilation_cache, prepare,
                        run_in_process, run_python)

pytestmark = pytest.mark.slow  # subprocesses with several (simulated) devices or processes

# Runs train.py in a child whose orbax commit of one step blocks forever after all of its data is written
# (just before the rename that makes it visible), announcing it in a marker file: the parent then
# SIGKILLs the child in the middle of that save.
HANG_IN_SAVE = r"""
import os, sys, time
from pathlib import Path
from orbax.checkpoint._src.path import atomicity

commit = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self):
    if self.get_final().name == os.environ["HANG_AT_STEP"]:
        Path(os.environ["MARKER"]).write_text(str(self.get()))
        time.sleep(600)
    return await commit(self)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = ["train.py", *sys.argv[1:]]
import train
sys.exit(train.main(sys.argv[1:]))
"""


# Runs train.py in a child that blocks when the loop is about to save step HANG_AT_STEP, announcing it in a
# marker file: the parent SIGKILLs it there, after the previous save completed and before the next.
HANG_BEFORE_SAVE = r"""
import os, sys, time
from pathlib import Path
from llama_jax.checkpoint.run import RunCheckpoints

save = RunCheckpoints.save

def hanging(self, step, *args):
    if step == int(os.environ["HANG_AT_STEP"]):
        Path(os.environ["MARKER"]).write_text(str(step))
        time.sleep(600)
    return save(self, step, *args)

RunCheckpoints.save = hanging
sys.argv = ["train.py", *sys.argv[1:]]
import train
sys.exit(train.main(sys.argv[1:]))
"""

# Runs train.py in a child that blocks right after orbax renamed step HANG_AT_STEP into place (the save is
# complete on disk), before anything else runs: the narrowest window between a save and its record.
HANG_AFTER_COMMIT = r"""
import os, sys, time
from pathlib import Path
from orbax.checkpoint._src.path import atomicity

commit = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self):
    await commit(self)
    if self.get_final().name == os.environ["HANG_AT_STEP"]:
        Path(os.environ["MARKER"]).write_text(str(self.get_final()))
        time.sleep(600)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = ["train.py", *sys.argv[1:]]
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("recovery_corpus"))


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """This process and the children share test_train.py's on-disk compilation cache."""
    directory = tmp_path_factory.getbasetemp() / "jax_cache"
    for _ in persistent_compilation_cache(directory):
        yield {"JAX_COMPILATION_CACHE_DIR": str(directory)}


def _wait_for(predicate, proc, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early with {proc.returncode}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.05)


def _spawn(args, env_extra):
    env = {**child_env(), **env_extra}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kill(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(corpus, cache_env, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "hanging"
    args = overrides(corpus, run_dir, stop_at_step=8, checkpoint_every=2)
    child = _spawn(["-c", HANG_IN_SAVE, *args], {**cache_env, "HANG_AT_STEP": "4", "MARKER": str(marker)})
    try:
        _wait_for(marker.exists, child, timeout=120)
        child.send_signal(signal.SIGKILL)
    finally:
        _kill(child)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "2").is_dir() and not (checkpoints / "4").exists()
    assert Path(marker.read_text()).is_dir()  # step 4's data, written but never committed
    killed_losses = losses_from_jsonl(run_dir)
    assert max(killed_losses) >= 4

    proc = run_python("import sys, train; sys.exit(train.main(sys.argv[1:]))", *args, env_extra=cache_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout and "checkpoints/2 (step 2)" in proc.stdout
    assert not Path(marker.read_text()).exists()  # the unfinished save was cleaned up
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6, 8]
    resumed = losses_from_jsonl(run_dir)
    assert sorted(resumed) == list(range(1, 9))
    assert {s: resumed[s] for s in killed_losses} == killed_losses  # bitwise the same losses again


def _killed_after_step_4_was_saved(script, corpus, cache_env, tmp_path):
    """SIGKILL a run (checkpoints every 2 steps) in `script`'s hang around step 4's save; (run_dir, args,
    the losses it logged)."""
    run_dir, marker = tmp_path / "run", tmp_path / "hanging"
    args = overrides(corpus, run_dir, stop_at_step=8, checkpoint_every=2)
    step_4 = run_dir / "checkpoints" / "4"
    child = _spawn(["-c", script, *args], {**cache_env, "HANG_AT_STEP": "4" if script is HANG_AFTER_COMMIT else "6",
                                           "MARKER": str(marker)})
    try:
        _wait_for(lambda: marker.exists() and step_4.is_dir(), child, timeout=180)
        time.sleep(1)  # whatever follows the save in the background has had its time
        child.send_signal(signal.SIGKILL)
    finally:
        _kill(child)
    return run_dir, args, losses_from_jsonl(run_dir)


def _assert_resumed_from_step_2_not_4(proc, run_dir, killed_losses, why):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(rf"checkpoint step 4 is (damaged|unverified): .*({why})", out), out
    assert "resuming from" in out and "checkpoints/2 (step 2)" in out and "(step 4)" not in out
    assert "peak_lr" not in out and "not finite" not in out  # damage is not blamed on the learning rate
    assert [p.name.split(".")[1].split("-")[0] for p in (run_dir / "checkpoints").iterdir()
            if p.name.startswith("4.")] in (["corrupt"], ["unverified"])  # moved aside, never deleted
    resumed = losses_from_jsonl(run_dir)
    assert sorted(resumed) == list(range(1, 9))
    assert {s: resumed[s] for s in killed_losses} == killed_losses  # bitwise the same losses again


def test_sigkill_after_a_save_then_a_bit_flip_in_it_falls_back_to_the_step_before(corpus, cache_env, tmp_path):
    """The crash window of issue 26: killed after step 4's save completed and before step 6's, step 4's largest
    file then damaged in place (same size). The rerun must not resume from step 4 (nor bless it with a
    record): it sets step 4 aside and repeats the killed run's losses from step 2."""
    run_dir, args, killed_losses = _killed_after_step_4_was_saved(HANG_BEFORE_SAVE, corpus, cache_env, tmp_path)
    params = run_dir / "checkpoints" / "4" / "params"
    largest = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))
    proc = run_python("import sys, train; sys.exit(train.main(sys.argv[1:]))", *args, env_extra=cache_env)
    _assert_resumed_from_step_2_not_4(proc, run_dir, killed_losses, "CRC-32 differs|no integrity record")


def test_a_step_killed_between_its_commit_and_its_record_is_not_resumed(corpus, cache_env, tmp_path):
    """Killed right after orbax renamed step 4 into place, before its integrity record: nothing vouches for
    step 4's files, so the rerun sets it aside as unverified and resumes from step 2."""
    run_dir, args, killed_losses = _killed_after_step_4_was_saved(HANG_AFTER_COMMIT, corpus, cache_env, tmp_path)
    assert not (run_dir / "checkpoint_integrity" / "4.json").exists()
    proc = run_python("import sys, train; sys.exit(train.main(sys.argv[1:]))", *args, env_extra=cache_env)
    _assert_resumed_from_step_2_not_4(proc, run_dir, killed_losses, "no integrity record")


def test_sigterm_saves_a_final_checkpoint_and_exits(corpus, cache_env, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(corpus, run_dir, steps=500, checkpoint_every=1000)
    child = _spawn(["train.py", *args], cache_env)
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses_from_jsonl(run_dir)) >= 3,
                  child, timeout=120)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    finally:
        _kill(child)
    assert child.returncode == 143, out
    saved = int(out.split("SIGTERM: saved step ")[1].split(",")[0])
    assert saved >= 3 and sorted(losses_from_jsonl(run_dir))[-1] == saved
    steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [saved]
    meta = json.loads(meta_path(run_dir / "checkpoints" / str(saved)).read_text())
    assert meta["step"] == saved and meta["data"]["batch"] == saved


RESHARD = r"""
import json, sys
sys.path.insert(0, "tests")
import jax
from pathlib import Path
from llama_jax.training.config import load_train_config
from llama_jax.training.loop import train
from test_train import overrides

corpus, tmp = json.loads(sys.argv[1]), Path(sys.argv[2])
assert jax.device_count() == 8
def run(**extra):
    return train(load_train_config(None, overrides(corpus, tmp / "run", global_batch_size=8, **extra)))
first = run(stop_at_step=2, **{"mesh.fsdp": 8})
second = run(stop_at_step=4, **{"mesh.fsdp": 4, "mesh.tensor": 2, "mesh.strategy": "fsdp+tp"})
print("RESULT", json.dumps({"losses": first.losses + second.losses, "resumed_at": second.first_step}))
"""


def test_restore_onto_another_mesh(corpus, cache_env, tmp_path):
    """Saved under fsdp=8, resumed under fsdp=4 × tensor=2 (8 simulated devices, in a child process);
    the oracle is the same run, uninterrupted, on this process's single device."""
    proc = run_python(RESHARD, json.dumps(corpus), str(tmp_path),
                      env_extra={**cache_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.split("RESULT ")[1])
    assert result["resumed_at"] == 3
    single = run_in_process(corpus, tmp_path / "single", global_batch_size=8, stop_at_step=4)
    assert result["losses"] == pytest.approx(single.losses, rel=1e-5)


def test_a_second_job_on_a_run_directory_in_use_is_refused(corpus, cache_env, tmp_path, capsys):
    """While a job trains, another on the same run_dir exits 2 naming the holder (and touches nothing);
    the first finishes with exactly the losses of a lone run; the lock is gone afterwards."""
    from llama_jax.cli.train import main as train_main

    run_dir, lone_dir = tmp_path / "run", tmp_path / "lone"
    args = overrides(corpus, run_dir, steps=40)
    child = _spawn(["train.py", *args], cache_env)
    try:
        _wait_for(lambda: (run_dir / "lock.json").exists(), child, timeout=120)
        holder = json.loads((run_dir / "lock.json").read_text())
        assert train_main(overrides(corpus, run_dir, steps=40, **{"optimizer.peak_lr": 5e-3})) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by job {holder['job']}" in err
        assert f"PID {child.pid}" in err and holder["pid"] == child.pid
        out, _ = child.communicate(timeout=300)
    finally:
        _kill(child)
    assert child.returncode == 0, out
    lone = run_in_process(corpus, lone_dir, steps=40)
    assert losses_from_jsonl(run_dir) == dict(zip(range(1, 41), lone.losses))  # bitwise: the first run alone
    assert "peak_lr: 0.01" in (run_dir / "config.yaml").read_text()  # the second job wrote nothing
    assert not (run_dir / "lock.json").exists()


def test_a_stale_lock_of_a_crashed_job_is_taken_over_with_a_warning(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = {"job": "crashed", "host": "elsewhere", "pid": 1, "started": time.time() - 7200,
             "heartbeat": time.time() - 3600}
    (run_dir / "lock.json").write_text(json.dumps(stale))
    result = run_in_process(corpus, run_dir, steps=3, lock_stale_after_s=600)
    assert result.status == "completed"
    out = capsys.readouterr().out
    assert re.search(r"warning: taking over .*lock.json: its holder \(host elsewhere, PID 1\) sent no heartbeat "
                     r"for 36\d\d s", out), out
    assert not (run_dir / "lock.json").exists()


def test_the_lock_of_a_killed_job_on_this_host_is_taken_over_at_once(corpus, tmp_path, capsys):
    """A fresh heartbeat, but its process (on this host) is gone: no need to wait lock_stale_after_s."""
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = {"job": "killed", "host": socket.gethostname(), "pid": gone.pid, "started": time.time() - 60,
              "heartbeat": time.time() - 5}
    (run_dir / "lock.json").write_text(json.dumps(killed))
    result = run_in_process(corpus, run_dir, steps=3, lock_stale_after_s=600)
    assert result.status == "completed"
    assert f"its holder (host {socket.gethostname()}, PID {gone.pid}) is no longer running" in capsys.readouterr().out
    killed["pid"] = os.getpid()  # alive (this very process): refused
    (run_dir / "lock.json").write_text(json.dumps(killed))
    with pytest.raises(ConfigError, match=f"is in use by job killed .*PID {os.getpid()}"):
        run_in_process(corpus, run_dir, steps=6, lock_stale_after_s=600)


def test_divergence_exits_1_with_one_line_naming_the_steps(corpus, cache_env, tmp_path):
    """`python train.py` whose loss becomes NaN/inf: exit status 1 and one line on stderr naming the bad
    step and the last good checkpoint (the step before it), no traceback."""
    args = overrides(corpus, tmp_path / "run", checkpoint_every=1, **{"optimizer.peak_lr": "1.0e+30",
                                                                       "optimizer.warmup_steps": 0})
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env={**child_env(), **cache_env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    match = re.fullmatch(r"error: step (\d+): the loss \((\S+)\) or gradient norm \(\S+\) is not finite; "
                         r"stopping\. The last good checkpoint is step (\d+) in (\S+) \(lower optimizer\.peak_lr "
                         r"or check the data, then restart to resume from it\)\n", proc.stderr)
    assert match, proc.stderr[-3000:]
    assert int(match.group(3)) == int(match.group(1)) - 1 and Path(match.group(4)) == tmp_path / "run" / "checkpoints"
    assert "nan" in match.group(0) or "inf" in match.group(0)
