"""Property-based fuzzing of the eval task reader (`.jsonl` task files): whatever the bytes or the values,
`load_task_file` either returns the items the file holds or raises a ValueError naming the file (and
line); no other exception escapes, nothing hangs.

Oracle for accepted files: every item is rebuilt from its JSON line independently (the label's choice,
the answers, the entry point), so a reader that accepted a wrong value would disagree.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import strategies as st

from fuzzing import JSON_VALUES, fast_and_slow
from llama_jax.evaluation.catalog import mmlu_tasks
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
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
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


def test_a_lone_surrogate_is_named_with_its_file_line_and_field(tmp_path):
    """Valid JSON may spell a lone surrogate; as text it has no UTF-8 form and would fail in the tokenizer."""
    path = tmp_path / "task.jsonl"
    record = dict(RECORDS["multiple_choice"], choices=["sat", "r\udcffn"])
    path.write_text(json.dumps(RECORDS["multiple_choice"]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: choices\[1\]: a lone surrogate U\+DCFF"):
        load_task_file(str(path))


def test_a_line_separator_inside_a_string_stays_text(tmp_path):
    """JSON Lines end at "\\n": U+2028 and U+0085 written raw inside a string are part of the record."""
    path = tmp_path / "task.jsonl"
    record = dict(RECORDS["generate"], context="2+2\u2028=\x85")
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_task_file(str(path)).items[0].context == "2+2\u2028=\x85"


def test_a_lone_surrogate_in_a_catalog_task_file_is_named(tmp_path):
    root = tmp_path / "mmlu"
    root.mkdir()
    good = {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 0, "subject": "s"}
    (root / "dev.jsonl").write_text(json.dumps(good) + "\n")
    (root / "test.jsonl").write_text(json.dumps(dict(good, question="Q\ud800?")) + "\n")
    with pytest.raises(ValueError, match=rf"task mmlu: {root / 'test.jsonl'}:1: question: a lone surrogate U\+D800"):
        mmlu_tasks(str(tmp_path))


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
