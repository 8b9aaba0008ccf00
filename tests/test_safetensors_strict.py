"""The safetensors reader accepts exactly what the format allows (issue: overlapping, shifted or negative
`data_offsets` were read as data). Oracle: the `safetensors` package's own writer for valid files;
hand-built headers for the invalid ones; `hypothesis` for arbitrary mutations and structures."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from llama_jax.convert.common import ConvertError
from llama_jax.convert.safetensors_io import read_header, read_tensor

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((4,), np.float16),
           "c": np.full((2, 2), 7.0, np.float32)}


def write_raw(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def valid_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, str(path))
    return path


def split(path):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_a_valid_file_reads_back_exactly(tmp_path):
    path = valid_file(tmp_path)
    header = read_header(path)
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(read_tensor(path, name, header[name]), value)


@pytest.mark.parametrize("change, message", [
    (lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"][:1] + [h["a"]["data_offsets"][0] + 8]),
     "overlaps|unused|spans"),
    (lambda h: h["c"].update(data_offsets=[h["a"]["data_offsets"][0], h["a"]["data_offsets"][0] + 16]), "overlaps"),
    (lambda h: h["a"].update(data_offsets=[-8, 16]), r"0 <= begin <= end"),
    (lambda h: h["a"].update(data_offsets=[4, 28]), "leaves bytes"),
    (lambda h: h["a"].pop("data_offsets"), "exactly dtype, shape and data_offsets"),
    (lambda h: h["a"].update(shape=[2, -3]), "non-negative integers"),
    (lambda h: h["a"].update(shape=[3, 3]), "spans 24 bytes, its shape"),
    (lambda h: h["a"].update(dtype=["F32"]), "unsupported dtype"),
])
def test_inconsistent_headers_are_refused_naming_the_tensor(tmp_path, change, message):
    header, data = split(valid_file(tmp_path))
    change(header)
    write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ConvertError, match=message):
        read_header(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("header, data, message", [
    ([1, 2], b"", "is a JSON list, expected an object"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "cover 4 bytes of a 8-byte"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "cover 8 bytes of a 4-byte"),
])
def test_header_and_data_section_must_agree(tmp_path, header, data, message):
    write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ConvertError, match=message):
        read_header(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("shape, offsets", [
    ([2 ** 70], [0, 4]),  # an OverflowError in the element count
    ([2 ** 32, 2 ** 32], [0, 0]),  # an int64 element count wraps to 0: this read as an empty tensor
    ([2 ** 62, 0], [0, 0]),  # no elements, but numpy cannot make the array
    ([0, 2 ** 63], [0, 0]),
])
def test_shapes_beyond_any_array_are_refused_naming_the_tensor(tmp_path, shape, offsets):
    """One ConvertError line, not an OverflowError, and never a header accepted that then fails to read."""
    path = tmp_path / "huge.safetensors"
    write_raw(path, {"a": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}, b"\0" * offsets[1])
    with pytest.raises(ConvertError) as error:
        read_header(path)
    assert str(error.value) == f"{path}: tensor a: shape {shape} is too large for any array (2**63 bytes or more)"


@FUZZ
@given(position=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_byte_mutations_give_the_same_tensors_or_a_convert_error(tmp_path, position, value, cut):
    """Flip or truncate anywhere: the reader raises ConvertError or returns well-formed tensors; never
    another exception, and a header it accepts always tiles the file's data section."""
    raw = bytearray(valid_file(tmp_path).read_bytes())
    raw[position % len(raw)] = value
    if cut % 3 == 0:  # a third of the examples also lose up to 15 trailing bytes
        del raw[len(raw) - cut % 16:]
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(raw))
    try:
        header = read_header(path)
    except ConvertError:
        return
    for name, entry in header.items():
        tensor = read_tensor(path, name, entry)
        assert tensor.shape == tuple(entry["shape"])


entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "F64"]),
    "shape": st.lists(st.integers(-1, 4) | st.sampled_from([2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63, 2 ** 70]), max_size=3),
    "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3),
})


@FUZZ
@given(header=st.dictionaries(st.text("abc", min_size=1, max_size=3), entries, max_size=4),
       data_bytes=st.integers(0, 96))
def test_structurally_valid_but_wrong_headers_never_read_past_their_ranges(tmp_path, header, data_bytes):
    path = tmp_path / "structured.safetensors"
    write_raw(path, header, bytes(range(256))[:data_bytes] if data_bytes <= 256 else b"")
    try:
        parsed = read_header(path)
    except ConvertError:
        return
    covered = sorted(tuple(e["data_offsets"]) for e in parsed.values())
    assert sum(end - begin for begin, end in covered) == data_bytes
    for name, entry in parsed.items():
        assert read_tensor(path, name, entry).shape == tuple(entry["shape"])
