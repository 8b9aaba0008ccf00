"""The run lock's races: the window between the exclusive create of `lock.json` and the write of its
record, and two jobs taking over one stale lock.

A second job that looks in that window finds an empty (or half-written) file. It must count as held: the
job that created it is about to write its record. The window is widened here by holding the first job's
write until the second job has tried (and by hand-made empty files); the oracle is which job ends up
holding the lock: the first, with its record in the file, the second refused. The takeover race is
widened the same way, by running one job's takeover inside the other's.
"""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from llama_jax.training.run_lock import LOCK_FILE, RunDirectoryLocked, RunLock


def _lock(run_dir, said=None):
    return RunLock(run_dir, heartbeat_s=3600, stale_after_s=600, say=(said if said is not None else []).append)


def test_a_second_job_in_the_window_before_the_first_writes_its_record_is_refused(tmp_path, monkeypatch):
    first, second = _lock(tmp_path), _lock(tmp_path)
    created, tried = threading.Event(), threading.Event()
    record = RunLock._record

    def slow_record(self):  # runs between the first job's exclusive create and its write
        if self is first:
            created.set()
            assert tried.wait(30)
        return record(self)

    monkeypatch.setattr(RunLock, "_record", slow_record)
    outcome = {}

    def hold():
        with first:
            outcome["record"] = json.loads((tmp_path / LOCK_FILE).read_text())

    holder = threading.Thread(target=hold)
    holder.start()
    assert created.wait(30)
    assert (tmp_path / LOCK_FILE).read_bytes() == b""  # the window is open
    try:
        with pytest.raises(RunDirectoryLocked, match=rf"^run_dir {tmp_path} is being taken by another job "
                                                     rf"\({tmp_path / LOCK_FILE}, created \d s ago, holds no record"):
            second.__enter__()
    finally:
        tried.set()
        holder.join(30)
    assert outcome["record"]["job"] == first.identity["job"]  # the first job kept its lock
    assert not (tmp_path / LOCK_FILE).exists()  # and released it


@pytest.mark.parametrize("content", [b"", b'{"job": "abc", "host": "h', b"\x00" * 40, b'{"job": "x", "heartbeat": "soon"}'])
def test_a_lock_without_a_record_is_held_until_its_file_is_stale(tmp_path, content):
    """Empty, half-written, zeroed by a crash, or no usable heartbeat: held while the file is younger than
    stale_after_s; older, taken over with one warning."""
    path = tmp_path / LOCK_FILE
    path.write_bytes(content)
    with pytest.raises(RunDirectoryLocked, match="is being taken by another job"):
        _lock(tmp_path).__enter__()
    assert path.read_bytes() == content
    old = time.time() - 3600
    os.utime(path, (old, old))
    said = []
    with _lock(tmp_path, said) as lock:
        assert json.loads(path.read_text())["job"] == lock.identity["job"]
    assert len(said) == 1 and said[0].startswith(f"warning: taking over {path}: its holder (host ?, PID ?) sent "
                                                 f"no heartbeat for 36")
    assert not path.exists()


def test_train_py_refuses_a_run_dir_whose_lock_is_being_taken(tmp_path, capsys):
    """Through the command line: exit 2, one line, the lock file untouched."""
    from llama_jax.cli.train import main

    (tmp_path / LOCK_FILE).write_bytes(b"")
    assert main([f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run_dir {tmp_path} is being taken by another job") and err.count("\n") == 1
    assert (tmp_path / LOCK_FILE).read_bytes() == b""


def _stale_lock(path):
    """A lock left by a job on another host whose heartbeat stopped an hour ago."""
    path.write_text(json.dumps({"job": "gone", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}))


def test_two_jobs_taking_over_one_stale_lock_leave_one_holder(tmp_path):
    """The second job's whole takeover runs while the first, having judged the lock stale, announces its
    own (the `say` callback): the first must not then delete the lock the second took, nor the second
    delete the first's. The oracle: exactly one job holds, and the file carries its record."""
    path = tmp_path / LOCK_FILE
    _stale_lock(path)
    second = _lock(tmp_path)
    outcome = {}

    def second_job_meanwhile(message):
        try:
            second.__enter__()
            outcome["second"] = "held"
        except RunDirectoryLocked as e:
            outcome["second"] = str(e)

    first = RunLock(tmp_path, heartbeat_s=3600, stale_after_s=600, say=second_job_meanwhile)
    try:
        first.__enter__()
        outcome["first"] = "held"
    except RunDirectoryLocked as e:
        outcome["first"] = str(e)
    holders = [name for name in ("first", "second") if outcome[name] == "held"]
    assert len(holders) == 1, outcome
    job = {"first": first, "second": second}[holders[0]]
    assert json.loads(path.read_text())["job"] == job.identity["job"]
    assert "another job is taking over its stale lock" in outcome["second"]
    job.__exit__(None, None, None)
    assert not path.exists() and not (tmp_path / f".{LOCK_FILE}.takeover").exists()


def test_a_stale_lock_taken_over_meanwhile_by_another_job_is_left_to_it(tmp_path, monkeypatch):
    """A job that judged the lock stale, but finds a new holder's lock once it may remove it (the other
    job's takeover ran in between), leaves that lock alone and is refused."""
    path = tmp_path / LOCK_FILE
    _stale_lock(path)
    said = []
    first, second = _lock(tmp_path, said), _lock(tmp_path)
    take_over = RunLock._take_over

    def other_job_first(self, stale, warning):
        if self is first:
            second.__enter__()
        return take_over(self, stale, warning)

    monkeypatch.setattr(RunLock, "_take_over", other_job_first)
    with pytest.raises(RunDirectoryLocked, match=rf"^run_dir {tmp_path} is in use by job {second.identity['job']}"):
        first.__enter__()
    assert json.loads(path.read_text())["job"] == second.identity["job"]
    assert said == []  # the first job announced no takeover: it removed nothing
    second.__exit__(None, None, None)


def test_a_takeover_file_left_by_a_dead_job_is_removed_once_stale(tmp_path):
    path, guard = tmp_path / LOCK_FILE, tmp_path / f".{LOCK_FILE}.takeover"
    _stale_lock(path)
    guard.write_bytes(b"")
    with pytest.raises(RunDirectoryLocked, match="another job is taking over its stale lock"):
        _lock(tmp_path).__enter__()
    old = time.time() - 3600
    os.utime(guard, (old, old))
    with _lock(tmp_path) as lock:
        assert json.loads(path.read_text())["job"] == lock.identity["job"]
    assert not guard.exists()
