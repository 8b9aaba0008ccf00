"""Property-based fuzzing of the eval task reader (`.jsonl` task files): whatever the bytes or the values,
`load_task_file` either returns the items the file holds or raises a ValueError naming the file (and
line); no other exception escapes, nothing hangs.

Oracle for accepted files: every item is rebuilt from its JSON line independently (the label's choice,
the answers, the entry point), so a reader that accepted a wrong value would disagree.
"""
from __future__ import annotations

import json

from hypothesis import strategies as st

from fuzzing import JSON_VALUES, fast_and_slow
from llama_jax.evaluation.suite import load_task_file

RECORDS = {
    "multiple_choice": {"id": "m1", "context": "The cat", "choices": ["sat", "ran"], "label": 1},
    "generate": {"type": "generate", "id": 7, "context": "2+2=", "answers": ["4", "four"]},
    "code": {"type": "code", "id": "c1", "prompt": "def f(x):\n", "tests": "assert f(1) == 1",
             "entry_point": "f", "target": "    return x\n"},
}


def loads_as_written_or_names_the_file(path):
    try:
        task = load_task_file(str(path))
    except ValueError as e:
        assert str(path) in str(e) and "\n" not in str(e).strip(), str(e)
        return
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(task.items) == len(records)
    for item, record in zip(task.items, records):
        kind = record.get("type", "multiple_choice")
        assert task.kind == kind
        if kind == "multiple_choice":
            assert item.continuations[item.label].strip() == record["choices"][record["label"]].strip()
        elif kind == "generate":
            assert list(item.answers) == record["answers"] and item.context == record["context"]
        else:
            assert item.entry_point == record["entry_point"] and item.tests == record["tests"]


def test_a_line_nested_too_deeply_is_named(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100000 + "\n")
    loads_as_written_or_names_the_file(path)


def _mutated_bytes(tmp_path, kind, edits):
    raw = bytearray((json.dumps(RECORDS[kind]) + "\n").encode() * 2)
    for position, value in edits:
        raw[position % len(raw)] = value
    path = tmp_path / "task.jsonl"
    path.write_bytes(bytes(raw))
    loads_as_written_or_names_the_file(path)


def _wrong_values(tmp_path, kind, changes):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({**RECORDS[kind], **changes}) + "\n", encoding="utf-8")
    loads_as_written_or_names_the_file(path)


test_task_byte_mutations, test_task_byte_mutations_many = fast_and_slow(
    _mutated_bytes, kind=st.sampled_from(sorted(RECORDS)),
    edits=st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)), min_size=1, max_size=4))
test_task_wrong_values, test_task_wrong_values_many = fast_and_slow(
    _wrong_values, kind=st.sampled_from(sorted(RECORDS)), changes=st.dictionaries(
        st.sampled_from(["type", "id", "context", "choices", "label", "answers", "target", "prompt", "tests",
                         "entry_point", "layout"]), JSON_VALUES, min_size=1, max_size=3))
