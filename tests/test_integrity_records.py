"""The integrity records (`llama_jax.checkpoint.integrity`): the files as written check clean; any change to a
file is named; a record of any bytes or structure is either exactly the record written (then the files check
clean) or one line naming it, never another exception (hypothesis: byte mutations, wrong structures)."""
from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import strategies as st

from fuzzing import JSON_VALUES, fast_and_slow
from llama_jax.checkpoint.integrity import damage, write_record


def files(tmp_path):
    directory = tmp_path / "step"
    (directory / "params").mkdir(parents=True, exist_ok=True)
    (directory / "params" / "data").write_bytes(bytes(range(256)) * 40)
    (directory / "meta").write_text('{"step": 4}')
    return directory


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "params" / "data").write_bytes(b"\0" * 10240), "changed since it was saved (CRC-32 differs)"),
    (lambda d: (d / "params" / "data").write_bytes(b"\0" * 10), "has 10 bytes, 10240 when saved"),
    (lambda d: (d / "meta").unlink(), "is missing"),
])
def test_written_files_check_clean_and_each_change_is_named(tmp_path, change, message):
    directory = files(tmp_path)
    write_record(tmp_path / "4.json", directory)
    assert damage(tmp_path / "4.json", directory) is None
    assert json.loads((tmp_path / "4.json").read_text())["meta"] == [11, zlib.crc32(b'{"step": 4}')]
    change(directory)
    assert message in damage(tmp_path / "4.json", directory)
    assert damage(tmp_path / "5.json", directory) == f"it has no integrity record ({tmp_path / '5.json'})"


def _checks_or_names_the_record(tmp_path, content: bytes):
    directory = files(tmp_path)
    write_record(tmp_path / "4.json", directory)
    written = json.loads((tmp_path / "4.json").read_text())
    (tmp_path / "4.json").write_bytes(content)
    problem = damage(tmp_path / "4.json", directory)
    try:
        same = json.loads(content) == written
    except (ValueError, UnicodeDecodeError, RecursionError):
        same = False
    if same:
        assert problem is None
    else:
        assert isinstance(problem, str) and "\n" not in problem
        assert str(tmp_path / "4.json") in problem or str(directory) in problem


def _mutated_bytes(tmp_path, edits):
    directory = files(tmp_path)
    write_record(tmp_path / "4.json", directory)
    raw = bytearray((tmp_path / "4.json").read_bytes())
    for position, value in edits:
        raw[position % len(raw)] = value
    _checks_or_names_the_record(tmp_path, bytes(raw))


test_byte_mutations, test_byte_mutations_many = fast_and_slow(
    _mutated_bytes, edits=st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)), min_size=1, max_size=4))


def _wrong_structures(tmp_path, value):
    _checks_or_names_the_record(tmp_path, json.dumps(value).encode())


test_wrong_structures, test_wrong_structures_many = fast_and_slow(
    _wrong_structures, value=JSON_VALUES | st.dictionaries(
        st.sampled_from(["meta", "params/data", "../meta", "/etc/hostname", "", "x"]),
        JSON_VALUES | st.lists(st.integers(-2, 1 << 33), min_size=2, max_size=2), max_size=3))
