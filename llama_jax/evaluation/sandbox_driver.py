"""What runs inside the sandbox around one generated program: limits, identity, guards, the program, the verdict.

`sandbox.py` runs this file's source as `python -I -B -c SOURCE DATA_FD VERDICT_FD UID CPU MEMORY PROCESSES
FILES FILE_BYTES` (standard library only: it runs where llama_jax may not be importable). DATA_FD holds a
fresh random token followed by the program; VERDICT_FD is a pipe the evaluator reads; UID is the
unprivileged user to become (-1: stay).

Why the program cannot forge the verdict, although it runs in this very process and may do what this
code does (the evaluator passes a program only when it received the token and the process exited 0):

- The token lives only in the closure of `verdict_hook`, an audit hook that never raises and never calls
  anything the program controls, so none of its frames ever reaches the program (frames escape through
  tracebacks and callbacks only). The function itself is referenced by the interpreter's hook list alone;
  the one route to it from Python is gc's object walks, which `guard_hook` refuses. The process's memory
  is out of reach too: ctypes and opening anything under /proc are refused, and the process is made
  non-dumpable, so a child it starts cannot ptrace it or read /proc/PID/mem. DATA_FD is read and closed
  before the program starts, so scanning /proc/self/fd finds nothing.
- `verdict_hook` writes the token on the event "llama_jax.sandbox.verdict" only when the event comes from
  `_main`'s own frame object, recorded before the program started, and only once. Frames come into being
  only by calls, so no other code can raise the event from that frame (running `_main` or this whole
  driver again makes a new frame, which does not count), and `_main` raises it on the line after
  `exec(program)` returned: every statement of the program, its tests and `check(...)` included, ran
  without an exception. Tracing (sys.settrace, setprofile, sys.monitoring), the only way to make a frame
  jump over a line, is refused.
- Every other ending has no token: an exception, SystemExit from sys.exit / exit included, is caught and
  `_main` leaves by os._exit(1), so no atexit function or excepthook runs; os._exit, a signal or a crash
  never reaches the event.

`guard_hook` also keeps the old PEP 578 refusals (processes, signals, sockets, writes outside the working
directory): only a second layer now. PEP 578 hooks are not a sandbox; the operating system's isolation
around this process (bubblewrap, see sandbox.py) is the wall, and the verdict's argument above needs only
gc, /proc and ctypes to stay refused.
"""


def _arm(sys, os, data_fd, verdict_fd):
    """Read the token and the program, close DATA_FD, install both hooks; return the program's source."""
    chunks = []
    while True:
        chunk = os.read(data_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(data_fd)
    data = b"".join(chunks)
    token, source = data[:32], data[32:].decode("utf-8")
    del data, chunks
    main_frame, getframe, write = sys._getframe(1), sys._getframe, os.write
    released = []

    def verdict_hook(event, args):
        if event != "llama_jax.sandbox.verdict" or released or getframe(1) is not main_frame:
            return
        released.append(True)
        write(verdict_fd, token)

    refused = frozenset((
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "os.system",
        "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "os.kill",
        "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "os.chroot", "os.setuid",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
        "sys.monitoring.register_callback", "sys.addaudithook"))
    path_args = {"os.remove": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,),
                 "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.symlink": (1,), "os.link": (0, 1),
                 "os.utime": (0,), "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, fsdecode, root = os.path.realpath, os.fsdecode, os.path.realpath(os.getcwd())

    def inside(path):
        if isinstance(path, int) or path is None:
            return True
        real = realpath(fsdecode(path))
        return real == root or real.startswith(root + "/")

    def guard_hook(event, args):
        if event in refused or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, int) and path is not None and realpath(fsdecode(path)).startswith("/proc/"):
                raise PermissionError(f"sandbox: opening {path!r} is not allowed")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in path_args:
            for i in path_args[event]:
                if not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory")

    sys.addaudithook(verdict_hook)
    sys.addaudithook(guard_hook)
    return source


def _main():
    import os
    import resource
    import sys

    data_fd, verdict_fd, uid, cpu, memory, processes, files, file_bytes = map(int, sys.argv[1:9])
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_NOFILE, files),
                         (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    if uid >= 0:  # root inside the sandbox with only CAP_SETUID/CAP_SETGID: become a user of its own
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # leaving uid 0 also makes the process non-dumpable where fs.suid_dumpable is 0
    with open("/proc/sys/fs/suid_dumpable") as f:
        dumpable = uid < 0 or f.read().strip() != "0"
    if dumpable:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/PID/mem
    audit, exit_now, out, err = sys.audit, os._exit, sys.__stdout__, sys.__stderr__
    source = _arm(sys, os, data_fd, verdict_fd)
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:  # SystemExit too: leaving early is failing
        try:
            import traceback

            out.flush()
            traceback.print_exception(e, file=err)
            err.flush()
        except BaseException:
            pass
        exit_now(1)
    audit("llama_jax.sandbox.verdict")
    try:
        out.flush()
        err.flush()
    except BaseException:
        pass
    exit_now(0)


if __name__ == "__main__":
    globals().pop("_main")()
