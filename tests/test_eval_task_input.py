"""Bad task input is a one-line error naming the task and the item (exit 2) before any model exists, and
task YAMLs and their item files, read and turned into few-shot prompts, raise nothing but `TaskError`
whatever their bytes or values (hypothesis, `fuzzing.fast_and_slow`). JSONL task files alone are fuzzed
in test_eval_task_fuzz.py."""
from __future__ import annotations

import importlib
import json
import re

import pytest
import yaml
from hypothesis import strategies as st

from fuzzing import JSON_VALUES, fast_and_slow
from llama_jax.evaluation.suite import TaskError, build_prompts, load_task_file

GEN = {"type": "generate", "context": "Q: who?\nA:", "answers": ["Ann", "Bo"], "target": "Ann", "id": "g"}
MC = {"context": "The sky is", "choices": ["blue", "green"], "label": 0, "id": 7}
CODE = {"type": "code", "prompt": "def f(x):\n", "tests": "def check(c):\n    assert c(1) == 1\n",
        "entry_point": "f", "layout": "humaneval", "target": "    return x\n"}
YAML = {"task": "qa", "test": "items.jsonl", "fewshot": "shots.jsonl", "num_fewshot": 1, "description": "D\n\n",
        "target_delimiter": " ", "fewshot_delimiter": "\n", "sampler": "random", "until": ["\n"],
        "answer_format": "squad", "max_new_tokens": 8}


def load_and_prompt(path) -> None:
    """What `eval.py tasks` and training do with a task file before a model exists."""
    task = load_task_file(str(path))
    for k in (0, 1, 2):
        build_prompts(task, k)


def only_task_errors(path) -> None:
    try:
        load_and_prompt(path)
    except TaskError as e:
        assert "\n" not in str(e).strip() and str(e)


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ------------------------------------------------------------------------------ command line, exit 2

CLI_CASES = {
    "no answers": ("qa.jsonl", ['{"type": "generate", "context": "q", "answers": []}'],
                   r"task qa: .*qa.jsonl:1: item 1 has no answers"),
    "no entry point": ("qa.jsonl", ['{"type": "code", "prompt": "p", "tests": "t", "id": "c9"}'],
                       r"task qa: .*qa.jsonl:1: code item c9 has no entry point"),
    "malformed JSONL": ("qa.jsonl", ['{"type": "generate", "context": "q", "answers": ["a"]}', "{not json"],
                        r"task qa: .*qa.jsonl:2: not valid JSON"),
    "K beyond the pool": ("qa.jsonl", ['{"type": "generate", "context": "q%d", "answers": ["a"]}' % i for i in (1, 2)],
                          r"task qa: --num-fewshot 5 is larger than the example pool \(1 in its other items\)"),
    "malformed YAML": ("qa.yaml", ["test: items.jsonl", "until: [unclosed"],
                       r"task qa: .*qa.yaml: invalid YAML: .* line 3"),
    "unknown YAML key": ("qa.yaml", ["test: items.jsonl", "num_shots: 2"], r"task qa: unknown key num_shots"),
    "YAML value of the wrong type": ("qa.yaml", ["test: items.jsonl", "until: 5"], r"task qa: until: expected a list"),
    "unknown task": (None, [], r"unknown task 'qa': expected one of \[.*'humaneval'"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_task_input_exits_2_before_loading_any_model(tmp_path, capsys, monkeypatch, case):
    """One line on stderr, exit 2, and no checkpoint read nor program compiled (both would fail loudly)."""
    import jax

    name, lines, message = CLI_CASES[case]
    (tmp_path / "items.jsonl").write_text(jsonl([GEN]))
    spec = "qa"
    if name is not None:
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        spec = str(tmp_path / name)
    cli = importlib.import_module("eval")
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before the input was checked"))
    missing_checkpoint = str(tmp_path / "no_checkpoint")  # never reached: input is checked first
    assert cli.main(["tasks", missing_checkpoint, "--tasks", spec, "--num-fewshot", "5"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.count("\n") == 1 and "no_checkpoint" not in err


# ------------------------------------------------------------------------------------------- fuzzing

def valid_files(tmp_path) -> dict[str, bytes]:
    """Valid files: a task YAML with its item and few-shot files, and JSONL tasks of the three item types
    (which the fuzzed YAMLs may name instead)."""
    others = [{**GEN, "id": "h", "context": "Q: why?\nA:"}, {**GEN, "id": "i", "context": "Q: how?", "answers": ["C"]}]
    files = {"gen.jsonl": jsonl([GEN, *others]),
             "mc.jsonl": jsonl([MC, {**MC, "label": 1, "id": 8}, {**MC, "choices": ["a", "b", "c"], "id": 9}]),
             "code.jsonl": jsonl([CODE, {**CODE, "entry_point": "g"}]),
             "items.jsonl": jsonl([GEN, others[0]]), "shots.jsonl": jsonl(others),
             "qa.yaml": yaml.safe_dump(YAML)}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name in ("gen.jsonl", "mc.jsonl", "qa.yaml"):
        load_and_prompt(tmp_path / name)  # the seeds of the mutations are valid
    return {name: text.encode() for name, text in files.items()}


MUTABLE = ("qa.yaml", "items.jsonl", "shots.jsonl")  # a task YAML and the item and few-shot files it names
mutations = st.lists(st.tuples(st.sampled_from(("set", "insert", "delete")), st.integers(0, 10_000),
                               st.integers(0, 255)), min_size=1, max_size=6)


def check_mutated_bytes(tmp_path, name, edits, cut):
    original = valid_files(tmp_path)[name]
    data = bytearray(original[:max(cut, 1)] if cut is not None else original)
    for op, position, value in edits:
        i = position % (len(data) + 1)
        if op == "insert":
            data.insert(i, value)
        elif data and op == "set":
            data[i % len(data)] = value
        elif data:
            del data[i % len(data)]
    (tmp_path / name).write_bytes(bytes(data))
    only_task_errors(tmp_path / "qa.yaml")


test_mutated_task_yaml_raises_only_task_errors, test_mutated_task_yaml_raises_only_task_errors_thoroughly = \
    fast_and_slow(check_mutated_bytes, name=st.sampled_from(MUTABLE), edits=mutations,
                  cut=st.none() | st.integers(0, 400))

yaml_keys = st.sampled_from((*YAML, "num_shots")) | st.integers(0, 3) | st.text(max_size=4)


def check_wrong_yaml(tmp_path, changes, dropped):
    valid_files(tmp_path)
    settings_ = {k: v for k, v in {**YAML, **changes}.items() if k not in dropped}
    (tmp_path / "qa.yaml").write_text(yaml.safe_dump(settings_))
    only_task_errors(tmp_path / "qa.yaml")


yaml_values = JSON_VALUES | st.integers(-2, 40) | st.sampled_from(
    ("items.jsonl", "gen.jsonl", "mc.jsonl", "code.jsonl", ".", "first_n"))
test_wrong_yaml_settings_raise_only_task_errors, test_wrong_yaml_settings_raise_only_task_errors_thoroughly = \
    fast_and_slow(check_wrong_yaml, changes=st.dictionaries(yaml_keys, yaml_values, max_size=4),
                  dropped=st.sets(st.sampled_from(tuple(YAML)), max_size=2))


def test_the_fuzzed_readers_do_refuse_bad_input(tmp_path):
    """The property above is not vacuous: each kind of damage it generates is refused with a TaskError."""
    valid_files(tmp_path)
    (tmp_path / "bad.jsonl").write_bytes(b'{"context": "a", "choices": ["x", "y"], "label": 2}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:1: key 'label'"):
        load_and_prompt(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\xfe\n")
    with pytest.raises(TaskError, match="not UTF-8"):
        load_and_prompt(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text("[" * 5000 + "\n")
    with pytest.raises(TaskError, match="bad.jsonl:1"):
        load_and_prompt(tmp_path / "bad.jsonl")
    (tmp_path / "qa.yaml").write_text("test: items.jsonl\n1: 2\n")
    with pytest.raises(TaskError, match="key 1 is not a name"):
        load_and_prompt(tmp_path / "qa.yaml")
    (tmp_path / "qa.yaml").write_text("test: .\n")
    with pytest.raises(TaskError, match="task qa: cannot read"):
        load_and_prompt(tmp_path / "qa.yaml")
