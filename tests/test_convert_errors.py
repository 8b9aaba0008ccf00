"""Bad input to the converter: a clear error naming the file and tensor, and nothing left at DST."""
import json
import os
import shutil

import pytest
import torch

from llama_jax.convert import ConvertError, convert
from llama_jax.cli.convert import main
from llama_jax.convert.safetensors_io import read_header
from test_convert import CONFIGS, exported_sources, save_random


class NotATensor:
    """Any class: unpickling it would run arbitrary code, so weights_only loading must refuse."""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A Meta export with 2 shards and an HF export of one small model (copied before each mutation)."""
    return exported_sources(tmp_path_factory.mktemp("sources"), model_parallel=2)


def copy_of(sources, name, tmp_path):
    shutil.copytree(sources / name, tmp_path / name)
    return tmp_path / name


def assert_fails(src, dst, *needles, **kwargs):
    """convert(src -> dst) raises a ConvertError whose message names every needle; nothing is written."""
    with pytest.raises(ConvertError) as info:
        convert(src, dst, progress=False, **kwargs)
    for needle in needles:
        assert str(needle) in str(info.value), (needle, str(info.value))
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}*")), "temporary directory left behind"


def edit_shard(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_missing_shard(sources, tmp_path):
    meta = copy_of(sources, "meta", tmp_path)
    (meta / "consolidated.00.pth").unlink()
    assert_fails(meta, tmp_path / "out", "consolidated.00.pth", "missing", to="hf")


def test_shard_count_that_does_not_match_the_split(sources, tmp_path):
    meta = copy_of(sources, "meta", tmp_path)
    (meta / "consolidated.01.pth").unlink()  # one shard of two: every split tensor is half its size
    assert_fails(meta, tmp_path / "out", "consolidated.00.pth", "tok_embeddings.weight", "(128, 32)", to="orbax")


def test_unexpected_key(sources, tmp_path):
    meta = copy_of(sources, "meta", tmp_path)
    edit_shard(meta / "consolidated.01.pth", lambda s: s.update({"layers.0.attention.wq.bias": torch.zeros(32)}))
    assert_fails(meta, tmp_path / "out", "consolidated.01.pth", "layers.0.attention.wq.bias", "unexpected", to="hf")


def test_missing_key(sources, tmp_path):
    meta = copy_of(sources, "meta", tmp_path)
    edit_shard(meta / "consolidated.00.pth", lambda s: s.pop("layers.1.ffn_norm.weight"))
    assert_fails(meta, tmp_path / "out", "consolidated.00.pth", "layers.1.ffn_norm.weight", "missing", to="hf")


def test_shape_that_contradicts_params_json(sources, tmp_path):
    meta = copy_of(sources, "meta", tmp_path)
    params = json.loads((meta / "params.json").read_text())
    params.pop("ffn_dim_multiplier", None)
    params["multiple_of"] = 256  # Meta's rule now gives an FFN size of 256, the weights have 96
    (meta / "params.json").write_text(json.dumps(params))
    assert_fails(meta, tmp_path / "out", "consolidated.00.pth", "feed_forward.w1.weight", "(48, 64)", "(128, 64)",
                 to="orbax")


def test_shape_that_contradicts_config_json(sources, tmp_path):
    hf = copy_of(sources, "hf", tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    assert_fails(hf, tmp_path / "out", "model.safetensors", "mlp.gate_proj.weight", "(96, 64)", "(128, 64)", to="meta")


def test_unsupported_dtype_in_meta_shard(sources, tmp_path):
    meta = copy_of(sources, "meta", tmp_path)
    edit_shard(meta / "consolidated.00.pth", lambda s: s.update({"norm.weight": s["norm.weight"].double()}))
    assert_fails(meta, tmp_path / "out", "consolidated.00.pth", "norm.weight", "float64", to="hf")


def test_unsupported_dtype_in_safetensors(sources, tmp_path):
    hf = copy_of(sources, "hf", tmp_path)
    path = hf / "model.safetensors"
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + size].decode()
    entry = '"model.norm.weight":{"dtype":"F32"'
    assert entry in header
    raw[8:8 + size] = header.replace(entry, entry.replace("F32", "I32")).encode()  # same length
    path.write_bytes(bytes(raw))
    with pytest.raises(ConvertError, match="model.norm.weight has unsupported dtype I32"):
        read_header(path)
    assert_fails(hf, tmp_path / "out", "model.safetensors", "model.norm.weight", "I32", to="orbax")


def test_overlapping_safetensors_ranges_are_refused(sources, tmp_path):
    """Layer 1's q_proj pointing at layer 0's bytes was once read as data (a model with wq[1] == wq[0])."""
    hf = copy_of(sources, "hf", tmp_path)
    path = hf / "model.safetensors"
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header["model.layers.1.self_attn.q_proj.weight"]["data_offsets"] = \
        header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"]
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
    assert_fails(hf, tmp_path / "out", "model.safetensors", "q_proj.weight", "data_offsets", to="orbax")
    assert main([str(hf), str(tmp_path / "out2"), "--to", "hf", "--no-progress"]) != 0
    assert not (tmp_path / "out2").exists()


def test_a_shape_beyond_any_array_is_one_line_exit_2(sources, tmp_path, capsys):
    """A safetensors shape whose element count overflows ([2**70]) was an OverflowError traceback."""
    hf = copy_of(sources, "hf", tmp_path)
    path = hf / "model.safetensors"
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header["model.norm.weight"]["shape"] = [2 ** 70]
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
    assert main([str(hf), str(tmp_path / "out"), "--to", "orbax", "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: {path}: tensor model.norm.weight: shape [{2 ** 70}] is too large "
                                       f"for any array (2**63 bytes or more)\n")
    assert not (tmp_path / "out").exists()


def test_requested_dtype_must_be_known(sources, tmp_path):
    assert_fails(sources / "hf", tmp_path / "out", "--dtype", "fp64", to="meta", dtype="fp64")


def test_pth_that_needs_arbitrary_unpickling_is_refused(sources, tmp_path):
    meta = copy_of(sources, "meta", tmp_path)
    state = torch.load(meta / "consolidated.00.pth", weights_only=True)
    torch.save({**state, "extra": NotATensor()}, meta / "consolidated.00.pth")
    assert_fails(meta, tmp_path / "out", "consolidated.00.pth", "refusing to unpickle", to="hf")


def test_replicated_tensor_that_differs_between_shards(sources, tmp_path):
    # found only while streaming, after the temporary target exists: it must be removed
    meta = copy_of(sources, "meta", tmp_path)
    edit_shard(meta / "consolidated.01.pth", lambda s: s["norm.weight"].add_(1.0))
    assert_fails(meta, tmp_path / "out", "consolidated.01.pth", "norm.weight", "differs", to="hf")


def test_missing_safetensors_shard(sources, tmp_path):
    src, _, _ = save_random(tmp_path, "ours", CONFIGS["mha"])
    convert(src, tmp_path / "hf", to="hf", max_shard_bytes=40_000, progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "hf" / victim).unlink()
    assert_fails(tmp_path / "hf", tmp_path / "out", victim, "missing", to="orbax")


def test_model_parallel_that_does_not_divide(sources, tmp_path):
    assert_fails(sources / "hf", tmp_path / "out", "--model-parallel 3", "tok_embeddings.weight", to="meta",
                 model_parallel=3)


def test_existing_destination_is_not_touched(sources, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    with pytest.raises(ConvertError, match="already exists"):
        convert(sources / "hf", tmp_path / "out", to="meta", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]


def test_unknown_params_json_key_and_preset_mismatch(sources, tmp_path):
    meta = copy_of(sources, "meta", tmp_path)
    assert_fails(meta, tmp_path / "out", "--preset tiny", "vocab_size=8000", "has 128", to="hf", preset="tiny")
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "moe_experts": 8}))
    assert_fails(meta, tmp_path / "out", "params.json", "moe_experts", to="hf")


def test_cli_reports_the_error_and_exits_2(sources, tmp_path, capsys):
    meta = copy_of(sources, "meta", tmp_path)
    (meta / "consolidated.00.pth").unlink()
    assert main(["--to", "hf", "--no-progress", str(meta), str(tmp_path / "out")]) == 2
    assert "consolidated.00.pth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["--to", "orbax", "--no-progress", str(sources / "hf"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.yaml").is_file() and (tmp_path / "out" / "tokenizer.model").is_file()


def test_wrong_source_format_names_the_missing_file(sources, tmp_path):
    assert_fails(sources / "meta", tmp_path / "out", "config.json", "missing", to="orbax", src_format="hf")
    assert_fails(sources / "hf", tmp_path / "out", "params.json", "missing", to="orbax", src_format="meta")
    assert_fails(sources / "hf", tmp_path / "out", "model.yaml", to="meta", src_format="orbax")


def test_a_killed_conversions_leftovers_are_removed_by_the_next_one(sources, tmp_path, capsys):
    """SIGKILL leaves `.DST.convert-tmp-HOST-PID`; the next conversion to DST removes it (its process is
    dead) and says so, and keeps a live process's directory and another host's."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dst = socket.gethostname(), tmp_path / "out"
    stale = tmp_path / f".out.convert-tmp-{host}-{int(dead.stdout)}"
    live = tmp_path / f".out.convert-tmp-{host}-{os.getppid()}"
    other_host = tmp_path / f".out.convert-tmp-elsewhere-{int(dead.stdout)}"
    for d in (stale, live, other_host):
        (d / "partial").mkdir(parents=True)
    convert(sources / "hf", dst, to="orbax", progress=False)
    assert dst.is_dir() and not stale.exists() and live.exists() and other_host.exists()
    assert f"warning: removed {stale}, left by a process that no longer runs" in capsys.readouterr().err


@pytest.mark.parametrize("index, message", [
    ([], "expected a JSON object, got list"),
    ({"metadata": {}}, "weight_map must map tensor names to file names"),
    ({"weight_map": ["model.safetensors"]}, "weight_map must map tensor names to file names"),
    ({"weight_map": {"lm_head.weight": 3}}, "weight_map must map tensor names to file names"),
    ({"weight_map": {"lm_head.weight": "../model.safetensors"}}, "weight_map must map tensor names to file names"),
    ("[" * 100000, "invalid JSON"),
])
def test_a_wrong_safetensors_index_is_one_line_naming_it(sources, tmp_path, index, message):
    hf = copy_of(sources, "hf", tmp_path)
    (hf / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    assert_fails(hf, tmp_path / "out", hf / "model.safetensors.index.json", message, to="meta")


def test_json_nested_too_deeply_is_one_line_naming_the_file(sources, tmp_path):
    meta = copy_of(sources, "meta", tmp_path)
    (meta / "params.json").write_text("[" * 100000)
    assert_fails(meta, tmp_path / "out", meta / "params.json", "invalid JSON", to="hf")
