"""One job per run directory: `RUN/lock.json`, held by process 0 of the job that trains there.

A second job on a run directory in use would delete the first one's unfinished checkpoint saves and
interleave its metrics with the first's. Process 0 creates the lock file exclusively (`O_CREAT|O_EXCL`)
with the job's identity (a random id, host, PID, start time) and refreshes its `heartbeat` time every
`heartbeat_s` seconds from a background thread; the other processes of the same job share process 0's
lock (they wait for its verdict, so a refused job exits 2 on every host). A job finding the file held
is refused with a message naming the holder, unless the holder is gone: a process of this host that no
longer runs (killed, out of memory), or a heartbeat older than `stale_after_s` (a crashed job
elsewhere); then the lock is taken over with a warning, by one job only (`RunLock._take_over`). A lock
file without a readable record (the moment between the exclusive create and the write of the record, or
a job that died in it) counts as held until its modification time is `stale_after_s` old. The lock is
removed when the job ends, however it ends, short of a crash (which leaves a heartbeat that goes stale).

Guarantees: on a local disk and on POSIX shared file systems whose exclusive create is atomic (NFSv3+,
Lustre, GPFS), at most one job trains in a directory, except that a job whose heartbeat stalls for
longer than `stale_after_s` (a frozen host) can lose its lock to another. Object stores (gcsfuse, s3fs)
do not implement exclusive create atomically: there the lock only catches the common mistake, not a
race between two jobs started within the same second.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import jax

from llama_jax.utils.config_io import ConfigError
from llama_jax.utils.files import process_alive

LOCK_FILE = "lock.json"


class RunDirectoryLocked(ConfigError):
    """Another job holds the run directory."""


class RunLock:
    """Hold `run_dir`'s lock for the duration of a `with` block (see the module docstring)."""

    def __init__(self, run_dir: Path, *, heartbeat_s: float, stale_after_s: float, say=print):
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s, self.say = heartbeat_s, stale_after_s, say
        self.identity = {"job": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                         "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        refusal = self._acquire() if jax.process_index() == 0 else ""
        if jax.process_count() > 1:  # every process learns process 0's verdict
            from jax.experimental import multihost_utils

            refused = multihost_utils.broadcast_one_to_all(jax.numpy.int32(bool(refusal)))
            refusal = refusal or (f"{self.path} is held by another job (see process 0's message)" if refused else "")
        if refusal:
            raise RunDirectoryLocked(refusal)
        if jax.process_index() == 0:
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if jax.process_index() != 0:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._holder().get("job") == self.identity["job"]:
            self.path.unlink(missing_ok=True)

    def _record(self) -> bytes:
        return json.dumps({**self.identity, "heartbeat": time.time()}).encode()

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _snapshot(self) -> tuple | None:
        """What identifies the lock file now (its record, inode and modification time), None if absent."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return self._holder(), stat.st_ino, stat.st_mtime_ns

    def _acquire(self) -> str:
        """"" once the lock is ours, else the message refusing this job."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen = self._snapshot()
                if seen is None:  # released in the meantime
                    continue
                holder, _, mtime_ns = seen
                heartbeat = holder.get("heartbeat")
                recorded = type(heartbeat) in (int, float) and math.isfinite(heartbeat)
                # no record (yet): the job is between its create and its write, or died there
                age = time.time() - (heartbeat if recorded else mtime_ns / 1e9)
                pid = holder.get("pid")
                dead = (holder.get("host") == self.identity["host"] and isinstance(pid, int)
                        and not isinstance(pid, bool) and pid > 0 and not process_alive(pid))
                if age <= self.stale_after_s and not dead:
                    return (f"run_dir {self.path.parent} is in use by job {holder.get('job', '?')} "
                            f"(host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, heartbeat "
                            f"{age:.0f} s ago): use another run_dir, or wait for it to finish" if recorded
                            else f"run_dir {self.path.parent} is being taken by another job ({self.path}, created "
                            f"{age:.0f} s ago, holds no record yet): use another run_dir, or wait for it to finish")
                why = ("is no longer running" if dead else
                       f"sent no heartbeat for {age:.0f} s (stale after {self.stale_after_s:g} s)")
                refusal = self._take_over(seen, f"warning: taking over {self.path}: its holder (host "
                                                f"{holder.get('host', '?')}, PID {holder.get('pid', '?')}) {why}")
                if refusal:
                    return refusal
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            return ""
        return f"run_dir {self.path.parent}: another job took the lock while this one took over a stale one"

    def _take_over(self, stale: tuple, warning: str) -> str:
        """Remove the lock file judged stale (`stale`, its `_snapshot`), then "" to create ours; or the
        message refusing this job.

        Two jobs that find the same stale lock must not both take it: the second would delete the lock the
        first has just created. So the removal happens under a second exclusive file, `.lock.json.takeover`,
        and only if the lock file is still the one judged stale (not already a new holder's). A takeover
        file left by a job that died in these few lines is removed once `stale_after_s` old.
        """
        guard = self.path.with_name(f".{LOCK_FILE}.takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:
                age = time.time() - guard.stat().st_mtime
            except FileNotFoundError:  # that takeover ended in the meantime: look again
                return ""
            if age > self.stale_after_s:
                guard.unlink(missing_ok=True)
                return ""
            return (f"run_dir {self.path.parent}: another job is taking over its stale lock ({guard}, "
                    f"{age:.0f} s ago): use another run_dir, or wait for it to finish")
        try:
            if self._snapshot() == stale:
                self.say(warning)
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)
        return ""

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self._holder().get("job") != self.identity["job"]:
                self.say(f"warning: {self.path} now belongs to another job (this one's heartbeat stalled); "
                         f"this job no longer holds the run directory")
                return
            tmp = self.path.with_name(f".{LOCK_FILE}.{self.identity['job']}")
            tmp.write_bytes(self._record())
            tmp.replace(self.path)
