"""The run lock's window between the exclusive create of `lock.json` and the write of its record.

A second job that looks in that window finds an empty (or half-written) file. It must count as held: the
job that created it is about to write its record. The window is widened here by holding the first job's
write until the second job has tried (and by hand-made empty files); the oracle is which job ends up
holding the lock: the first, with its record in the file, the second refused.
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
