"""Hostile generated programs against the code sandbox, one test per attack class of issue 32.

Each attack runs as a HumanEval-style completion whose tests fail, through the path `eval.py tasks`
uses (`code_exec.execute`), and each test asserts the three things that matter: nothing outside the
sandbox changed (a snapshot of a directory of the evaluating machine, its processes, its listening
socket), the evaluator survived, and the verdict is not "passed". The oracle is the machine itself
(files, /proc, a socket), never the sandbox's own report of what it refused.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llama_jax.evaluation.code_exec import CodeItem, execute
from llama_jax.evaluation.sandbox import Limits, run_program

REPO = Path(__file__).resolve().parents[1]
FAST = Limits(timeout_s=5, cpu_s=5, memory_bytes=1 << 30)
ITEM = CodeItem("attack/0", "def add(a, b):\n", "def check(candidate):\n    assert candidate(2, 3) == 5\n", "add")
WRONG = "    return a - b\n"  # the tests fail with this body: only an attack could make it "pass"

# Starts a program with `_posixsubprocess.fork_exec`, the route that raises no audit event.
FORK_EXEC = '''
import _posixsubprocess, os
def spawn(argv, setsid=False):
    return _posixsubprocess.fork_exec([a.encode() for a in argv], [argv[0].encode()], False, (), None, None,
                                      -1, -1, -1, -1, -1, -1, *os.pipe(), False, setsid, -1, None, None, None,
                                      -1, None, False)
'''


def attack(code: str, limits: Limits = FAST) -> str:
    """The verdict of `code` run at the top of a wrong completion of ITEM."""
    completion = WRONG + "\n" + code + "\n"
    return execute([ITEM], [[completion]], limits, workers=1)[0][0].status


def assert_contained(outside: Path, code: str) -> None:
    """`code` fails and leaves every file under `outside` as it was (bytes, mode, mtime)."""
    before = snapshot(outside)
    assert attack(code) == "failed"
    assert snapshot(outside) == before


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def outside(tmp_path):
    """A directory of the evaluating machine holding a file, both writable by everyone."""
    tmp_path.chmod(0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("original\n")
    victim.chmod(0o666)
    return tmp_path


def test_the_control_a_right_completion_passes_and_the_wrong_one_fails():
    outcomes = execute([ITEM], [["    return a + b\n", WRONG]], FAST, workers=2)[0]
    assert [o.status for o in outcomes] == ["passed", "failed"]


# ------------------------------------------------------------------------------------- file system

def test_at_calls_cannot_create_delete_or_rename_outside(outside):
    code = f'''
import os
for step in (lambda fd: os.close(os.open("created.txt", os.O_CREAT | os.O_WRONLY, dir_fd=fd)),
             lambda fd: os.rename("victim.txt", "renamed.txt", src_dir_fd=fd, dst_dir_fd=fd),
             lambda fd: os.unlink("victim.txt", dir_fd=fd),
             lambda fd: os.mkdir("made", dir_fd=fd)):
    try:
        step(os.open({str(outside)!r}, os.O_RDONLY | os.O_DIRECTORY))
    except OSError:
        pass
'''
    assert_contained(outside, code)


def test_a_hard_link_made_inside_cannot_overwrite_a_file_outside(outside):
    code = f'''
import os
try:
    os.link({str(outside / "victim.txt")!r}, "inside_link")
    with open("inside_link", "w") as f:
        f.write("overwritten through a hard link\\n")
except OSError:
    pass
'''
    assert_contained(outside, code)


def test_chmod_and_utime_through_a_file_descriptor_change_nothing_outside(outside):
    code = f'''
import os
try:
    fd = os.open({str(outside / "victim.txt")!r}, os.O_RDONLY)
    os.chmod(fd, 0o700)
    os.utime(fd, (0, 0))
except OSError:
    pass
'''
    assert_contained(outside, code)


# -------------------------------------------------------------------------------------- processes

def test_fork_exec_cannot_start_a_program_that_writes_outside(outside):
    code = FORK_EXEC + f'''
try:
    pid = spawn(["/bin/sh", "-c", "echo pwned > {outside}/pwned.txt"])
    os.waitpid(pid, 0)
except OSError:
    pass
'''
    assert_contained(outside, code)


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_no_child_outlives_the_program_even_in_a_new_session():
    marker = f"{time.time_ns() % 10**6 + 1000}.25"  # `sleep MARKER`, unique to this run
    code = FORK_EXEC + f'''
try:
    spawn(["/bin/sleep", "{marker}"], setsid=True)
except OSError:
    pass
'''
    try:
        assert attack(code) == "failed"
        time.sleep(0.2)
        assert _processes_with(marker) == []
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def _evaluate_in_subprocess(source: str, timeout_s: float = 5, extra_env: dict | None = None) -> tuple[int, dict]:
    """Run `source` through `run_program` in a separate evaluator process: (its exit status, its report).
    EVALUATOR_PID in `source` becomes that process's pid (as the evaluating machine numbers it)."""
    script = ("import json, sys\nfrom llama_jax.evaluation.sandbox import Limits, run_program\n"
              f"o = run_program(sys.stdin.read(), Limits(timeout_s={timeout_s}, cpu_s=5, memory_bytes=1 << 30))\n"
              "print(json.dumps({'status': o.status, 'detail': o.detail[-4000:],"
              " 'peak_rss_kb': int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    evaluator = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
    out, _ = evaluator.communicate(source.replace("EVALUATOR_PID", str(evaluator.pid)), timeout=120)
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return evaluator.returncode, report


def test_the_program_cannot_signal_the_evaluator():
    source = ("import os, signal\n"
              "for pid in {os.getppid(), EVALUATOR_PID}:\n"
              "    try:\n"
              "        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)\n"
              "    except OSError:\n"
              "        pass\n"
              "assert False\n")
    returncode, report = _evaluate_in_subprocess(source)
    assert returncode == 0, "the evaluator was killed"
    assert report["status"] == "failed"


# ---------------------------------------------------------------------------------------- network

@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 of the evaluating machine: (port, a function saying whether anyone connected)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)

    def reached() -> bool:
        try:
            server.accept()[0].close()
            return True
        except BlockingIOError:
            return False

    yield server.getsockname()[1], reached
    server.close()


def test_no_network_not_even_through_the_evaluators_namespace(listener):
    port, reached = listener
    child = (f"import os, socket\n"
             f"for pid in (os.getppid(), {os.getpid()}, 1):\n"
             f"    try:\n"
             f"        os.setns(os.open(f'/proc/{{pid}}/ns/net', os.O_RDONLY), os.CLONE_NEWNET)\n"
             f"    except OSError:\n"
             f"        pass\n"
             f"    try:\n"
             f"        socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
             f"    except OSError:\n"
             f"        pass\n")
    code = FORK_EXEC + f'''
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
except Exception:
    pass
try:
    os.waitpid(spawn([{sys.executable!r}, "-c", {child!r}]), 0)
except OSError:
    pass
'''
    assert attack(code) == "failed"
    assert not reached()


def test_the_program_has_its_own_network_namespace_with_only_loopback():
    """Checked from inside, so that a sandbox without its network namespace fails here even when the audit
    hook refuses sockets (a right program: it must pass)."""
    own = os.readlink("/proc/self/ns/net")
    source = ("import os, socket\n"
              f"assert os.readlink('/proc/self/ns/net') != {own!r}, 'shares the evaluator network namespace'\n"
              "names = [name for _, name in socket.if_nameindex()]\n"
              "assert names == ['lo'], names\n")
    outcome = run_program(source, FAST)
    assert outcome.status == "passed", outcome.detail


# ------------------------------------------------------------------------------------------ reads

def test_the_evaluators_environment_and_etc_shadow_stay_unread():
    secret = f"llama-jax-secret-{time.time_ns()}"
    source = ("import os, sys\n"
              "for path in ('/proc/%d/environ' % os.getppid(), '/proc/EVALUATOR_PID/environ', '/etc/shadow'):\n"
              "    try:\n"
              "        sys.stderr.write(open(path, 'rb').read().decode('latin-1'))\n"
              "    except OSError:\n"
              "        pass\n"
              "sys.stderr.write(repr(dict(os.environ)))\n"
              "assert False\n")
    returncode, report = _evaluate_in_subprocess(source, extra_env={"LLAMA_JAX_TEST_SECRET": secret})
    assert returncode == 0 and report["status"] == "failed"
    assert secret not in report["detail"]
    assert "root:" not in report["detail"]  # /etc/shadow's first line


# ------------------------------------------------------------------------------------------ guard

def test_the_audit_hook_cannot_be_switched_off_through_gc(outside):
    """The attack of issue 32: find the hook's closure cells with gc and empty them, then write outside."""
    code = f'''
import gc, types
try:
    for cell in [o for o in gc.get_objects() if type(o) is types.CellType]:
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, frozenset):
            cell.cell_contents = frozenset()
        elif isinstance(value, str) and value.startswith("/"):
            cell.cell_contents = ""  # the hook's root: every path is "inside" now
        elif isinstance(value, dict):
            cell.cell_contents = {{}}
    open({str(outside / "pwned.txt")!r}, "w").write("hook disabled")
except Exception:
    pass
'''
    assert_contained(outside, code)


# --------------------------------------------------------------------------------------- verdicts

@pytest.mark.parametrize("cheat", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "exit(0)",
    "raise SystemExit(0)",
    "import atexit, os\natexit.register(lambda: os._exit(0))",
    "import sys, os\nsys.excepthook = lambda *a: os._exit(0)",
    "import os, sys\nsys.stdout.flush()\nos.write(1, b'passed\\n')\nos._exit(0)",
])
def test_skipping_or_hiding_the_tests_is_failed(cheat):
    assert attack(cheat) == "failed"


def test_an_exit_inside_the_candidate_is_failed():
    completion = "    import sys\n    sys.exit(0)\n"
    assert execute([ITEM], [[completion]], FAST, workers=1)[0][0].status == "failed"

def test_the_token_cannot_be_found_and_written_back_first():
    """The program hunts for the verdict token where it could be (every open descriptor, the frames above it,
    gc, the driver's own verdict event raised from its code) and writes whatever 32-byte candidates it
    finds to every descriptor, then exits 0 before the tests: still failed."""
    code = '''
import os, sys
candidates = []
for fd in range(3, 256):
    try:
        candidates.append(os.pread(fd, 4096, 0))
    except OSError:
        pass
    try:
        candidates.append(os.read(fd, 4096))
    except OSError:
        pass
frame = sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()):
        if isinstance(value, bytes):
            candidates.append(value)
        if callable(value) and getattr(value, "__name__", "") == "audit":
            value("llama_jax.sandbox.verdict")
    frame = frame.f_back
try:
    import gc
    candidates += [o for o in gc.get_objects() if isinstance(o, bytes)]
except Exception:
    pass
sys.audit("llama_jax.sandbox.verdict")
for fd in range(3, 256):
    for value in candidates:
        for start in range(0, max(1, len(value) - 31)):
            try:
                os.write(fd, value[start:start + 32])
            except OSError:
                break
os._exit(0)
'''
    assert attack(code) == "failed"

def test_a_child_of_the_program_cannot_read_its_memory():
    """Where the token lives: a program started by the program (no audit hook in it) cannot open the
    driver's /proc/PID/mem, the process being non-dumpable. A right program asserting so must pass."""
    reader = "import os\ntry:\n    open(f'/proc/{os.getppid()}/mem', 'rb').close()\nexcept OSError:\n    os._exit(3)\n"
    source = FORK_EXEC + f'''
_, status = os.waitpid(spawn([{sys.executable!r}, "-c", {reader!r}]), 0)
assert os.waitstatus_to_exitcode(status) == 3, "the driver's memory was readable"
'''
    outcome = run_program(source, FAST)
    assert outcome.status == "passed", outcome.detail




# ----------------------------------------------------------------------------------------- bounds

def test_a_stderr_flood_neither_fills_the_evaluators_memory_nor_stops_it():
    flood_mb = 512
    source = f"import sys\nchunk = b'x' * (1 << 20)\nfor _ in range({flood_mb}):\n    sys.stderr.buffer.write(chunk)\nassert False\n"
    start = time.monotonic()
    returncode, report = _evaluate_in_subprocess(source, timeout_s=30)
    assert returncode == 0 and report["status"] == "failed"
    assert report["peak_rss_kb"] < 200 * 1024, report["peak_rss_kb"]  # the flood is 512 MB
    assert time.monotonic() - start < 30


def test_a_grandchild_holding_the_pipes_does_not_stretch_the_timeout():
    code = FORK_EXEC + '''
try:
    spawn(["/bin/sleep", "30"], setsid=True)
except OSError:
    pass
while True:
    pass
'''
    start = time.monotonic()
    status = attack(code, Limits(timeout_s=1.5, cpu_s=60, memory_bytes=1 << 30))
    assert status == "timed out"
    assert time.monotonic() - start < 6


def test_a_killed_evaluator_leaves_no_program_running_and_no_temporary_files():
    marker = f"{time.time_ns() % 10**6 + 1000}.75"
    source = FORK_EXEC + f'spawn(["/bin/sleep", "{marker}"], setsid=True)\nwhile True:\n    pass\n'
    script = ("import sys\nfrom llama_jax.evaluation.sandbox import Limits, run_program\n"
              "run_program(sys.stdin.read(), Limits(timeout_s=60, cpu_s=60))\n")
    evaluator = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
    evaluator.stdin.write(source)
    evaluator.stdin.close()
    try:
        deadline = time.monotonic() + 20
        while not _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_with(marker), "the program never started"
        evaluator.kill()
        evaluator.wait()
        deadline = time.monotonic() + 5
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_with(marker) == []
        assert list(Path(tempfile.gettempdir()).glob(f"llama_jax_sandbox_{evaluator.pid}_*")) == []
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0, reason="RLIMIT_NPROC is exact only for the per-program uid bwrap gives as root")
def test_process_creation_is_capped_by_the_per_program_uid():
    """40 children started past the audit hook (fork_exec): at most `processes` exist at once. A right
    program asserting so must pass."""
    source = FORK_EXEC + '''
started = 0
for _ in range(40):
    try:
        spawn(["/bin/sleep", "5"])
        started += 1
    except OSError:
        break
assert started < 16, started
'''
    outcome = run_program(source, Limits(timeout_s=5, cpu_s=5, memory_bytes=1 << 30, processes=16))
    assert outcome.status == "passed", outcome.detail


def test_the_user_namespace_container_judges_the_same():
    """The container a non-root evaluator gets (`--unshare-user --disable-userns`, no uid change), built
    here whoever runs the tests: network and PID namespaces of its own, and the same verdicts."""
    from llama_jax.evaluation.isolation import Isolation

    user_ns = Isolation(bwrap=True, as_root=False)
    own = os.readlink("/proc/self/ns/net")
    right = (f"import os, socket\nassert os.readlink('/proc/self/ns/net') != {own!r}\n"
             "assert [n for _, n in socket.if_nameindex()] == ['lo']\nassert os.getpid() < 10\n")
    assert run_program(right, FAST, isolation=user_ns).status == "passed"
    for cheat in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "assert False\n"):
        assert run_program(cheat, FAST, isolation=user_ns).status == "failed"
