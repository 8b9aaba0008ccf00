"""Meta `.pth` shards whose pickle is valid but whose contents are wrong: values that are not tensors, keys
that are not names, unexpected or missing keys, other dtypes, sparse layouts, a wrapped state dict.

Opening such a checkpoint either fails with one ConvertError line naming the shard (or params.json), or
succeeds and then reads every tensor bit for bit as the unmutated checkpoint does (the oracle: the
mutations here never change a parameter's values, so an accepted file must give the original weights).
Byte-level mutations of the same files are fuzzed in test_convert_fuzz.py.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import strategies as st

from fuzzing import fast_and_slow
from llama_jax.convert import ConvertError, open_reader
from llama_jax.convert.common import tensor_items
from test_convert import exported_sources

VALUES = ("int", "text", "none", "list of the tensor", "dict of the tensor", "float64", "int32", "float16",
          "complex64", "sparse", "strided view", "wrong shape")


def replacement(kind: str, tensor):
    """A value standing in for `tensor`; only "strided view" keeps its dtype, shape and values."""
    import torch

    return {"int": lambda: 3, "text": lambda: "wq", "none": lambda: None, "list of the tensor": lambda: [tensor],
            "dict of the tensor": lambda: {"w": tensor}, "float64": lambda: tensor.double(),
            "int32": lambda: tensor.int(), "float16": lambda: tensor.half(), "complex64": lambda: tensor.to(torch.complex64),
            "sparse": lambda: tensor.to_sparse(), "wrong shape": lambda: tensor.reshape(-1),
            "strided view": lambda: tensor.t().contiguous().t() if tensor.ndim == 2 else tensor.clone()}[kind]()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The exported Meta directory, its state dict and the tensors its reader gives."""
    import torch

    meta = exported_sources(tmp_path_factory.mktemp("shard_fuzz"), model_parallel=1) / "meta"
    state = torch.load(meta / "consolidated.00.pth", weights_only=True)
    reader = open_reader(meta, "meta")
    tensors = {(t.ours, layer): np.ascontiguousarray(reader.tensor(t, layer)).copy()
               for t, layer in tensor_items(reader.cfg)}
    reader.close()
    return meta, state, tensors


def _mutated_state(original, tmp_path_factory, edits, wrap):
    import torch

    meta, saved, tensors = original
    state, names = dict(saved), sorted(saved)
    for action, index, kind in edits:
        name = names[index % len(names)]
        if action == "delete":
            state.pop(name, None)
        elif action == "replace":
            state[name] = replacement(kind, saved[name])
        else:
            state[("rope.freqs", "layers.0.extra.weight", 7, ("a", 1))[index % 4]] = replacement(kind, saved[name])
    target = tmp_path_factory.mktemp("case") / "meta"
    shutil.copytree(meta, target)
    torch.save({"list": [state], "model": {"model": state}, "none": state}[wrap], target / "consolidated.00.pth")
    try:
        reader = open_reader(target, "meta")
    except ConvertError as e:
        assert str(target) in str(e) and "\n" not in str(e), str(e)
        return
    for (name, layer), expected in tensors.items():
        got = np.ascontiguousarray(reader.tensor(reader.maps[name], layer))
        assert got.dtype == expected.dtype and np.array_equal(got.view(np.uint8), expected.view(np.uint8)), name
    reader.close()


test_wrong_shard_contents, test_wrong_shard_contents_many = fast_and_slow(
    _mutated_state, wrap=st.sampled_from(["none", "none", "list", "model"]),
    edits=st.lists(st.tuples(st.sampled_from(["delete", "replace", "add"]), st.integers(0, 1000),
                             st.sampled_from(VALUES)), min_size=0, max_size=3))
