"""Runs untrusted generated Python programs, never inside the evaluating process, and judges them on evidence.

Each program runs in a throw-away bubblewrap container (`isolation.py`: read-only system, private tmpfs,
no network, own PID namespace, clear environment, unprivileged user) under `sandbox_driver.py`, which
sets resource limits (CPU seconds, address space, open files, file size, processes), installs a PEP 578
audit hook as a second layer and runs the program. Where the container cannot run, `run_program`
refuses (IsolationUnavailable, naming what to install) unless the caller allows the audit hook alone
(`allow_unsafe`, the `--unsafe-run-generated-code` flag).

The verdict: "passed" only when the driver's token came back on the verdict pipe (the driver writes it
after `exec(program)` returned, and the program cannot forge it first: see sandbox_driver.py) and the
process exited with status 0 within the time; "timed out" past the wall-clock limit; "failed" otherwise.
Everything is bounded here too: the output (stdout and stderr together) is read as it comes and only
its last `Limits.output_bytes` kept (the rest counted); at the deadline the whole container is killed
(its PID namespace dies with it) and no pipe is waited on afterwards, whatever the program left running.
In the container nothing is written on the machine; without it (allow_unsafe) the program's temporary
directory is named after the evaluator's pid, and any left by an evaluator that no longer runs is
removed by the next one.
"""
from __future__ import annotations

import functools
import hmac
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llama_jax.evaluation import sandbox_driver
from llama_jax.evaluation.isolation import CLEAN_ENV, INSTALL_HINT, Isolation, IsolationUnavailable
from llama_jax.utils.files import process_alive

_DRIVER = Path(sandbox_driver.__file__).read_text(encoding="utf-8")
_TEMP_PREFIX = "llama_jax_sandbox_"
_UIDS = (1 << 31, (1 << 32) - 2)  # per-program users when root: far above any real or container-mapped uid


@dataclass(frozen=True)
class Limits:
    """What one program may use: wall and CPU seconds, address space, processes, files, output."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 2 << 30
    processes: int = 16
    open_files: int = 64
    file_bytes: int = 16 << 20
    output_bytes: int = 1 << 20


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed", "failed" or "timed out"
    detail: str  # the end of the output (or why it timed out)
    output_bytes: int = 0  # all it wrote to stdout and stderr, kept or not

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def find_isolation() -> Isolation | str:
    """The container when it works here (tried once per process), else why not (one line)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    isolation = Isolation(bwrap=True, as_root=os.geteuid() == 0)
    outcome = run_program("pass\n", Limits(timeout_s=30), isolation=isolation)
    if outcome.passed:
        return isolation
    lines = [line for line in outcome.detail.splitlines() if line.strip()]
    return f"bwrap does not start a container here ({lines[-1] if lines else outcome.status})"


def choose_isolation(allow_unsafe: bool = False) -> Isolation:
    """The container; without one the audit hook alone if allowed, else IsolationUnavailable (one line)."""
    found = find_isolation()
    if isinstance(found, Isolation):
        return found
    if allow_unsafe:
        return Isolation(bwrap=False)
    raise IsolationUnavailable(f"code tasks run generated programs only in a container, and {found}: {INSTALL_HINT}")


def run_program(source: str, limits: Limits = Limits(), *, allow_unsafe: bool = False,
                isolation: Isolation | None = None) -> Outcome:
    """Run `source` as a Python program in the sandbox (module docstring); never raises for its doings."""
    isolation = isolation or choose_isolation(allow_unsafe)
    token = secrets.token_bytes(32)
    data = os.memfd_create("llama_jax_program", 0)
    os.write(data, token + source.encode("utf-8", "surrogatepass"))
    os.lseek(data, 0, os.SEEK_SET)
    verdict_r, verdict_w = os.pipe()
    uid = secrets.randbelow(_UIDS[1] - _UIDS[0]) + _UIDS[0] if isolation.as_root else -1
    workdir = None if isolation.bwrap else _host_workdir()
    argv = [*isolation.command(tmp_bytes=4 * limits.file_bytes), sys.executable, "-I", "-B", "-c", _DRIVER,
            str(data), str(verdict_w), str(uid), str(limits.cpu_s), str(limits.memory_bytes), str(limits.processes),
            str(limits.open_files), str(limits.file_bytes)]
    try:
        proc = subprocess.Popen(argv, cwd=workdir or "/", env=CLEAN_ENV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(data, verdict_w),
                                start_new_session=True)
    except BaseException:
        os.close(verdict_r)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        os.close(data)
        os.close(verdict_w)
    try:
        return _supervise(proc, verdict_r, token, limits)
    finally:
        _kill(proc)
        os.close(verdict_r)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _supervise(proc: subprocess.Popen, verdict_r: int, token: bytes, limits: Limits) -> Outcome:
    """Read output and verdict as they come until both close and the process exits, or the deadline."""
    deadline = time.monotonic() + limits.timeout_s
    tail, total, verdict = bytearray(), 0, b""
    out = proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(out, selectors.EVENT_READ)
        selector.register(verdict_r, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Outcome("timed out", f"no exit within {limits.timeout_s} s", total)
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                elif key.fd == out:
                    total += len(chunk)
                    tail += chunk
                    del tail[:-limits.output_bytes]
                else:
                    verdict = (verdict + chunk)[:64]
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return Outcome("timed out", f"no exit within {limits.timeout_s} s", total)
    detail = tail[-4000:].decode("utf-8", "replace")
    if total > len(tail):
        detail = f"[{total} bytes of output, the last {len(tail)} kept]\n" + detail
    passed = proc.returncode == 0 and hmac.compare_digest(verdict, token)
    return Outcome("passed" if passed else "failed", detail, total)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group (bwrap; its PID namespace dies with it) and reap it; never waits on pipes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.stdout.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _host_workdir() -> str:
    return tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}_")


def remove_stale_workdirs(root: str | None = None) -> list[str]:
    """Delete the temporary directories of evaluators that no longer run (killed before they cleaned up)."""
    root = root or tempfile.gettempdir()
    removed = []
    for name in os.listdir(root):
        pid = name[len(_TEMP_PREFIX):].split("_", 1)[0]
        if not name.startswith(_TEMP_PREFIX) or not pid.isdigit() or process_alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(name)
    return removed


def run_programs(sources: Sequence[str], limits: Limits = Limits(), *, workers: int = 0,
                 allow_unsafe: bool = False) -> list[Outcome]:
    """`run_program` over many sources, `workers` at a time (default: the CPU count)."""
    isolation = choose_isolation(allow_unsafe)
    if not isolation.bwrap:
        remove_stale_workdirs()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda s: run_program(s, limits, isolation=isolation), sources))
