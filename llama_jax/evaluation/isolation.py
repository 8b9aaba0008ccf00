"""The operating-system container each generated program runs in: bubblewrap's command line, and whether it works here.

Bubblewrap (`bwrap`, Debian package `bubblewrap`, >= 0.8) builds a throw-away container out of kernel
namespaces. Ours has:

- a read-only view of the system: /usr (and the /bin, /lib*, /sbin links or directories), /etc and this
  Python's own directories (its venv and base installation), nothing else of the machine (no /home,
  /root, /work, /var, /run, no host /tmp);
- a private tmpfs at /tmp (its working directory, size-limited, gone with the container) as the only
  writable place;
- an empty network namespace (only its own loopback `lo`), its own PID namespace (the evaluator is invisible and
  cannot be signalled; when the program ends, or bwrap is killed, everything it started is killed by
  the kernel), its own IPC and UTS namespaces, a new session, `--die-with-parent`;
- a clear environment (`--clearenv`: nothing of the evaluator's);
- an unprivileged identity. As root (CI), bwrap runs without a user namespace and keeps only
  CAP_SETUID/CAP_SETGID, which the driver uses to become a fresh uid of its own (no file of the machine is
  its own, its process count is its own for RLIMIT_NPROC, the change makes it non-dumpable). As any
  other user, bwrap runs in a new user namespace (`--unshare-user --disable-userns`) as that user, with
  no capability outside.

`sandbox.find_isolation()` tries the container once per process (a trivial program through this command
line) and says why it does not work when it does not (no bwrap, user namespaces switched off, too old).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

INSTALL_HINT = ("install bubblewrap >= 0.8 (Debian/Ubuntu: apt-get install bubblewrap; as a non-root user it also "
                "needs unprivileged user namespaces), or pass --unsafe-run-generated-code (in training: "
                "eval_tasks.unsafe_run_generated_code=true) to run generated code with only the in-process audit hook")
_SYSTEM = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")


class IsolationUnavailable(ValueError):
    """Generated code would run without the container and the user did not accept that."""


@dataclass(frozen=True)
class Isolation:
    """How programs are contained. `bwrap` False: only the audit hook, in a host temporary directory."""

    bwrap: bool
    as_root: bool = False

    def command(self, tmp_bytes: int) -> list[str]:
        """The argv in front of the Python command (empty without bwrap)."""
        if not self.bwrap:
            return []
        argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox", "--clearenv"]
        for key, value in CLEAN_ENV.items():
            argv += ["--setenv", key, value]
        if self.as_root:
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            argv += ["--unshare-user", "--disable-userns"]
        for name in _SYSTEM:
            path = "/" + name
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
        made = set()
        for path in _python_dirs():
            parts = path.split("/")[1:-1]
            for depth in range(1, len(parts) + 1):  # traversable parents (bwrap copies /root's 0700)
                parent = "/" + "/".join(parts[:depth])
                if parent not in made:
                    made.add(parent)
                    argv += ["--perms", "0755", "--dir", parent]
            argv += ["--ro-bind", os.path.realpath(path), path]
        return argv + ["--chdir", "/tmp"]


CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "PYTHONHASHSEED": "0",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _python_dirs() -> list[str]:
    """This interpreter's directories outside the system view (a venv, a pyenv or conda installation)."""
    found = []
    for path in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                 os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))):
        if path.split("/")[1] in _SYSTEM or any(path == p or path.startswith(p + "/") for p in found):
            continue
        found = [p for p in found if not p.startswith(path + "/")] + [path]
    return found
