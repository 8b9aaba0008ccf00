"""Params-only checkpoints and run directories: exact round trips, checks against the config, atomic writes."""
import logging

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from llama_jax.convert import convert
from llama_jax.checkpoint.layout import find_tokenizer, read_model_config, write_model_config
from llama_jax.checkpoint.orbax_io import stored_arrays
from llama_jax.checkpoint.params import load_params, verified_params_item, save_params
from llama_jax.checkpoint.run import RunCheckpoints
from llama_jax.model import api
from llama_jax.utils.config_io import to_dict
from llama_jax.utils.trees import flatten
from test_convert import CONFIGS, assert_bit_equal, random_params


@pytest.mark.parametrize("dtype,name", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_params_dir_round_trip_is_exact(tmp_path, dtype, name):
    cfg = CONFIGS["gqa"].replace(param_dtype=name)
    params = random_params(cfg, dtype)
    (tmp_path / "tokenizer.json").write_text("{}")
    save_params(tmp_path / "ckpt", params, cfg, tokenizer_path=tmp_path / "tokenizer.json")
    assert read_model_config(tmp_path / "ckpt") == cfg
    assert find_tokenizer(tmp_path / "ckpt") == str(tmp_path / "ckpt" / "tokenizer.json")
    assert_bit_equal(load_params(tmp_path / "ckpt", cfg), params)


def test_load_checks_names_and_shapes_against_the_config(tmp_path):
    cfg = CONFIGS["mha"]
    save_params(tmp_path / "ckpt", random_params(cfg), cfg)
    with pytest.raises(ValueError, match=r"layers.feed_forward.w1.kernel has shape \(2, 64, 96\), "
                                         r"the config expects \(2, 64, 128\)"):
        load_params(tmp_path / "ckpt", cfg.replace(ffn_hidden_dim=128))
    with pytest.raises(ValueError, match="parameter output.kernel"):
        load_params(tmp_path / "ckpt", cfg.replace(tie_embeddings=True))


def test_save_refuses_bad_params_and_existing_dirs_leaving_nothing(tmp_path):
    cfg = CONFIGS["mha"]
    params = random_params(cfg)
    bad_shape = {**params, "norm": {"scale": np.ones(63, np.float32)}}
    with pytest.raises(ValueError, match=r"norm.scale has shape \(63,\), the config expects \(64,\)"):
        save_params(tmp_path / "a", bad_shape, cfg)
    with pytest.raises(ValueError, match="norm.scale is bfloat16, the config's param_dtype is float32"):
        save_params(tmp_path / "a", {**params, "norm": {"scale": np.ones(64, ml_dtypes.bfloat16)}}, cfg)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    with pytest.raises(FileExistsError):
        save_params(tmp_path / "a", params, cfg)
    assert list((tmp_path / "a").iterdir()) == []


def _write_run(run, cfg, steps):
    """A run directory laid out as the trainer writes it: config.yaml + the trainer's RunCheckpoints."""
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg), "seed": 0}))
    (run / "tokenizer.model").write_bytes(b"spm")
    ckpts = RunCheckpoints(run, keep=10)
    for step, params in steps.items():
        ckpts.save(step, params, {"mu": np.zeros(3)}, {"step": step})
    ckpts.close()


def test_reads_mute_their_own_absl_warnings_only(caplog):
    """While a thread reads, its absl warnings (orbax's expected ones) are dropped; its errors and
    every other thread's warnings (a training run's background saves) still show; afterwards nothing
    is dropped."""
    import threading

    from llama_jax.checkpoint.orbax_io import without_orbax_warnings

    absl = logging.getLogger("absl")
    filters = list(absl.filters)
    with caplog.at_level(logging.WARNING), without_orbax_warnings():
        absl.warning("this thread's warning")
        absl.error("this thread's error")
        other = threading.Thread(target=lambda: absl.warning("another thread's warning"))
        other.start()
        other.join()
    absl.warning("after the read")
    assert [r.getMessage() for r in caplog.records] == ["this thread's error", "another thread's warning",
                                                        "after the read"]
    assert absl.filters == filters


def test_run_dir_loads_the_latest_complete_step(tmp_path, monkeypatch, caplog):
    cfg = CONFIGS["mha"]
    latest = random_params(cfg, seed=2)
    _write_run(tmp_path / "run", cfg, {1: random_params(cfg, seed=1), 2: latest})
    (tmp_path / "run" / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir()  # an interrupted save
    assert read_model_config(tmp_path / "run") == cfg
    assert find_tokenizer(tmp_path / "run") == str(tmp_path / "run" / "tokenizer.model")
    caplog.clear()
    assert_bit_equal(load_params(tmp_path / "run", cfg), latest)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # orbax's are muted
    monkeypatch.chdir(tmp_path)  # a relative path, as in `eval.py perplexity runs/default`
    assert_bit_equal(load_params("run", cfg), latest)


def test_a_save_is_reported_done_only_once_recorded_and_a_failed_record_fails_it(tmp_path, monkeypatch):
    """Orbax records a step from its completion callback, in another thread: `wait` returns only after the
    record is on disk (a slow record is waited for), and a record that cannot be written is the save's
    failure (CheckpointSaveError naming the cause), not a warning lost in orbax's thread."""
    import time

    from llama_jax.checkpoint import integrity
    from llama_jax.checkpoint.run import CheckpointSaveError

    write_record = integrity.write_record

    def slow(record, *args):
        time.sleep(1.0)
        if record.stem == "2":
            raise OSError(28, "No space left on device", str(record))
        write_record(record, *args)

    monkeypatch.setattr(integrity, "write_record", slow)
    ckpts = RunCheckpoints(tmp_path, keep=10)
    ckpts.save(1, {"w": np.ones(3)}, {"mu": np.zeros(3)}, {"step": 1})
    ckpts.wait()
    assert ckpts.damage(1) is None
    ckpts.save(2, {"w": np.ones(3)}, {"mu": np.zeros(3)}, {"step": 2})
    with pytest.raises(CheckpointSaveError, match=r"saving checkpoint step 2 in .*No space left on device"):
        ckpts.close()


def test_load_with_shardings_returns_placed_arrays_in_the_config_dtype(tmp_path):
    cfg = CONFIGS["mha"]
    params = random_params(cfg)
    save_params(tmp_path / "ckpt", params, cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, params)
    loaded = load_params(tmp_path / "ckpt", cfg.replace(param_dtype="bfloat16"), shardings=shardings)
    for path, value in flatten(loaded).items():
        assert isinstance(value, jax.Array) and value.sharding == device
        expected = flatten(params)[path].astype(ml_dtypes.bfloat16)
        assert np.array_equal(np.asarray(value).view(np.uint16), expected.view(np.uint16)), path


@pytest.mark.parametrize("writer", ["save_params", "convert", "unchunked", "run"])
def test_params_dirs_are_chunked_along_embed_and_every_layout_loads_into_shardings(tmp_path, writer):
    """Params dirs (save_params, convert --to orbax) store every parameter in chunks one `embed` index
    thick, so a host loading an fsdp slice reads only its own chunks; a params dir written before that
    (one chunk per parameter) and a run's checkpoint (the trainer's shards) load too, bit-exact."""
    cfg = CONFIGS["gqa"]
    params = random_params(cfg)
    path = tmp_path / "ckpt"
    if writer == "unchunked":  # what save_params wrote before chunking
        path.mkdir()
        write_model_config(path, cfg)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((path / "params").absolute(), params)
        checkpointer.wait_until_finished()
    elif writer == "run":
        _write_run(path, cfg, {1: params})
    else:
        save_params(tmp_path / "src", params, cfg)
        if writer == "convert":
            convert(tmp_path / "src", path, to="orbax", progress=False)
        else:
            path = tmp_path / "src"
    stores = stored_arrays(verified_params_item(path))
    for p, names in flatten(api.param_axes(cfg)).items():
        shape = flatten(params)[p].shape
        thin = tuple(1 if name == "embed" else n for name, n in zip(names, shape))
        assert tuple(stores(p).chunk_layout.read_chunk.shape) == (shape if writer in ("unchunked", "run") else thin), p
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loaded = load_params(path, cfg, shardings=jax.tree.map(lambda _: device, params))
    assert_bit_equal(jax.tree.map(np.asarray, loaded), params)


def test_the_checkpoint_libraries_are_pinned_in_a_range_that_holds_the_tested_versions():
    """orbax_io.py relies on orbax internals: pyproject.toml bounds orbax-checkpoint and tensorstore, and the
    versions requirements.txt and .ci/constraints.txt pin (the ones CI tests) lie inside those bounds."""
    import re
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    declared = {r.name: r.specifier for r in map(Requirement, tomllib.loads(
        (root / "pyproject.toml").read_text())["project"]["dependencies"])}
    for name in ("orbax-checkpoint", "tensorstore"):
        spec = declared[name]
        assert any(s.operator == "<" for s in spec), f"{name} has no upper bound in pyproject.toml"
        pins = {re.search(rf"^{name}==(\S+)", (root / f).read_text(), re.M).group(1)
                for f in ("requirements.txt", ".ci/constraints.txt")}
        assert len(pins) == 1 and pins <= set(spec.filter(pins)), (name, pins, spec)
        assert version(name) in pins  # the environment running these tests is the pinned one
