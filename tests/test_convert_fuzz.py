"""Property-based fuzzing of the checkpoint readers (Meta `.pth` shards and `params.json`, Hugging Face
`config.json`): whatever the bytes or the structure, opening a checkpoint either succeeds with a config
that matches its tensors or raises ConvertError naming the file; nothing else escapes, nothing hangs."""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_jax.convert import ConvertError, open_reader
from test_convert import CONFIGS, exported_sources

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True)
                           | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(
                               st.text(max_size=5), c, max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return exported_sources(tmp_path_factory.mktemp("fuzz_sources"), model_parallel=1)


def opens_or_convert_error(path, fmt):
    try:
        reader = open_reader(path, fmt)
    except ConvertError as e:
        assert str(path) in str(e) or path.name in str(e), str(e)
        return
    for name in ("dim", "n_layers", "vocab_size"):  # what it read agrees with the weights it checked
        assert getattr(reader.cfg, name) == getattr(CONFIGS["mha"], name)
    reader.close()


def fresh_copy(sources, name, tmp_path_factory):
    target = tmp_path_factory.mktemp("case") / name
    shutil.copytree(sources / name, target)
    return target


@FUZZ
@given(position=st.integers(0, 1 << 20), value=st.integers(0, 255), cut=st.integers(0, 4096))
def test_mutated_meta_shards(sources, tmp_path_factory, position, value, cut):
    meta = fresh_copy(sources, "meta", tmp_path_factory)
    shard = meta / "consolidated.00.pth"
    raw = bytearray(shard.read_bytes())
    raw[position % len(raw)] = value
    if cut % 2:
        del raw[len(raw) - cut:]
    shard.write_bytes(bytes(raw))
    opens_or_convert_error(meta, "meta")


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta",
                                                "use_scaled_rope", "rope_scaling_factor", "max_seq_len", "x"]),
                               JSON_VALUES, max_size=3))
def test_structurally_wrong_params_json(sources, tmp_path_factory, changes):
    meta = fresh_copy(sources, "meta", tmp_path_factory)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, **changes}))
    opens_or_convert_error(meta, "meta")


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "intermediate_size", "vocab_size",
                                                "rope_scaling", "rope_theta", "head_dim", "rms_norm_eps",
                                                "tie_word_embeddings", "max_position_embeddings", "model_type"]),
                               JSON_VALUES, max_size=3), as_list=st.booleans())
def test_structurally_wrong_config_json(sources, tmp_path_factory, changes, as_list):
    hf = fresh_copy(sources, "hf", tmp_path_factory)
    config = {**json.loads((hf / "config.json").read_text()), **changes}
    (hf / "config.json").write_text(json.dumps([config] if as_list else config))
    opens_or_convert_error(hf, "hf")
