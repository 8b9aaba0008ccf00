"""The checkpoint meta reader (`checkpoints/<step>/meta/data.json`): what the training loop writes reads back
unchanged; anything else is one CheckpointMetaError line naming the file and the field, whatever the bytes
(hypothesis fuzz: byte mutations and structurally wrong values). A meta it accepts can be used: every
field has the type and range the data iterator and the spike detector rely on."""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import strategies as st

from fuzzing import JSON_VALUES, fast_and_slow
from llama_jax.checkpoint.run import CheckpointMetaError, meta_path, read_meta
from llama_jax.training.spikes import SpikeConfig, SpikeDetector

STEP = 40
VALID = {"step": STEP, "data": {"batch": 40, "source_rows": [120, 40], "seq_len": 32, "global_batch_size": 4},
         "seed": 0, "spikes": {"recent": [[3.25, 1.5], [3.0, 1.25]], "streak": [39, 40]}}


def write(tmp_path, content: bytes):
    step_dir = tmp_path / str(STEP)
    meta_path(step_dir).parent.mkdir(parents=True, exist_ok=True)
    meta_path(step_dir).write_bytes(content)
    return step_dir


def assert_usable(meta: dict) -> None:
    """What resuming does with a meta: ints where counters are, finite numbers in the spike history."""
    def counter(value, least):
        assert type(value) is int and value >= least, value

    counter(meta["step"], 0)
    assert meta["step"] == STEP and type(meta["seed"]) is int
    data = meta["data"]
    assert set(data) == {"batch", "source_rows", "seq_len", "global_batch_size"}
    counter(data["batch"], 0), counter(data["seq_len"], 1), counter(data["global_batch_size"], 1)
    assert isinstance(data["source_rows"], list) and data["source_rows"]
    for n in data["source_rows"]:
        counter(n, 0)
    detector = SpikeDetector(SpikeConfig(loss_factor=2.0, window=1000))
    detector.set_state(meta.get("spikes", {"recent": [], "streak": []}))
    assert json.loads(json.dumps(detector.get_state(), allow_nan=False)) == meta.get("spikes", detector.get_state())


def reads_or_names_the_file(step_dir):
    try:
        meta = read_meta(step_dir, STEP)
    except CheckpointMetaError as e:
        assert str(e).startswith(f"{meta_path(step_dir)}: ") and "\n" not in str(e), str(e)
        return None
    assert_usable(meta)
    return meta


def test_a_valid_meta_reads_back_unchanged(tmp_path):
    assert read_meta(write(tmp_path, json.dumps(VALID).encode()), STEP) == VALID
    without_spikes = {k: v for k, v in VALID.items() if k != "spikes"}  # checkpoints of earlier releases
    assert read_meta(write(tmp_path, json.dumps(without_spikes).encode()), STEP) == without_spikes


def test_a_step_saved_before_orbax_v1_reads_its_meta_from_the_v0_file_name(tmp_path):
    """Orbax v0 named the meta file `meta/metadata`, v1 `meta/data.json`: steps of runs saved before still
    resume; where both exist (never written so), v1's file is the one read."""
    step_dir = tmp_path / str(STEP)
    (step_dir / "meta").mkdir(parents=True)
    (step_dir / "meta" / "metadata").write_text(json.dumps(VALID))
    assert meta_path(step_dir) == step_dir / "meta" / "metadata" and read_meta(step_dir, STEP) == VALID
    (step_dir / "meta" / "data.json").write_text(json.dumps(dict(VALID, seed=1)))
    assert meta_path(step_dir) == step_dir / "meta" / "data.json" and read_meta(step_dir, STEP)["seed"] == 1
    lora = {**VALID, "lora_base": "runs/base"}  # a LoRA run's adapters name their base
    assert read_meta(write(tmp_path, json.dumps(lora).encode()), STEP) == lora


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["data"].update(batch=4.0), "data.batch: expected an integer >= 0, got 4.0"),
    (lambda m: m["data"].update(batch=True), "data.batch: expected an integer >= 0, got True"),
    (lambda m: m["data"]["source_rows"].__setitem__(1, -1), "data.source_rows[1]: expected an integer >= 0"),
    (lambda m: m["data"].update(extra=1), "data: unknown key extra"),
    (lambda m: m.pop("seed"), "meta: missing key seed"),
    (lambda m: m.update(step=41), "step: 41 in the checkpoint directory of step 40"),
    (lambda m: m.update(lora_base=""), "lora_base: expected the base checkpoint's path, got ''"),
    (lambda m: m.update(lora_base=3), "lora_base: expected the base checkpoint's path, got 3"),
    (lambda m: m["spikes"]["recent"].append([float("nan"), 1.0]), "spikes.recent[2][0]: expected a finite number"),
    (lambda m: m["spikes"]["streak"].append(41), "spikes.streak[2]: step 41 is after the checkpoint's step 40"),
])
def test_wrong_fields_are_named(tmp_path, edit, message):
    meta = copy.deepcopy(VALID)
    edit(meta)
    step_dir = write(tmp_path, json.dumps(meta).encode())
    with pytest.raises(CheckpointMetaError) as error:
        read_meta(step_dir, STEP)
    assert str(error.value).startswith(f"{meta_path(step_dir)}: {message}") and "\n" not in str(error.value)


@pytest.mark.parametrize("content, message", [
    (b'{"step": 40, "data": ', "not JSON (Expecting value"),
    (b"\xff\xfe{}", "not UTF-8 (byte 0)"),
    (b"[" * 100000, "not JSON ("),
    (b"[1, 2]", "meta: expected a mapping, got list"),
])
def test_unreadable_files_are_named(tmp_path, content, message):
    step_dir = write(tmp_path, content)
    with pytest.raises(CheckpointMetaError) as error:
        read_meta(step_dir, STEP)
    assert str(error.value).startswith(f"{meta_path(step_dir)}: {message}") and "\n" not in str(error.value)


def _mutated_bytes(tmp_path, edits):
    raw = bytearray(json.dumps(VALID).encode())
    for position, value in edits:
        raw[position % len(raw)] = value
    reads_or_names_the_file(write(tmp_path, bytes(raw)))


test_byte_mutations, test_byte_mutations_many = fast_and_slow(
    _mutated_bytes, edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4))

FIELDS = ["step", "seed", "data", "spikes", "data.batch", "data.source_rows", "data.seq_len",
          "data.global_batch_size", "spikes.recent", "spikes.streak", "extra", "data.extra"]


def _wrong_values(tmp_path, changes):
    meta = copy.deepcopy(VALID)
    for field, value in changes.items():
        *parents, key = field.split(".")
        node = meta
        for parent in parents:
            if not isinstance(node.get(parent), dict):
                node[parent] = {}
            node = node[parent]
        node[key] = value
    reads_or_names_the_file(write(tmp_path, json.dumps(meta).encode()))


test_structurally_wrong_values, test_structurally_wrong_values_many = fast_and_slow(
    _wrong_values, changes=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, min_size=1, max_size=3))
