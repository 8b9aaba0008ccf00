"""Configs: presets with exact parameter counts, validation errors that name the key."""
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_jax.model.config import ModelConfig, load_model_config, model_preset_names
from llama_jax.utils.config_io import ConfigError, apply_overrides, from_dict, load_yaml, parse_override
from llama_jax.model.api import param_count

PUBLISHED_PARAM_COUNTS = {
    "llama1-7b": 6_738_415_616, "llama1-13b": 13_015_864_320, "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672, "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496, "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824,
    "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
}

# The shapes in the published Hugging Face `config.json` of each model (meta-llama/Llama-2-7b-hf, ...):
# vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size.
HF_SHAPES = {
    "llama2-7b": (32000, 4096, 32, 32, 32, 11008),
    "llama2-13b": (32000, 5120, 40, 40, 40, 13824),
    "llama3.1-8b": (128256, 4096, 32, 32, 8, 14336),
    "llama3.1-70b": (128256, 8192, 80, 64, 8, 28672),
}


def count_from_hf_shapes(vocab, dim, layers, heads, kv_heads, hidden) -> int:
    """Parameters by hand: untied embedding and output, per layer q/o (dim²), k/v (dim × kv_heads·head_dim),
    three SwiGLU matrices and two RMSNorm scales, plus the final norm."""
    kv_dim = kv_heads * (dim // heads)
    per_layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden + 2 * dim
    return 2 * vocab * dim + layers * per_layer + dim


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAM_COUNTS))
def test_published_parameter_counts(preset):
    assert param_count(load_model_config(preset)) == PUBLISHED_PARAM_COUNTS[preset]


@pytest.mark.parametrize("preset", sorted(HF_SHAPES))
def test_preset_shapes_are_the_published_ones_and_count_by_hand(preset):
    """The published count follows from the published shapes (so neither table has a typo), and the
    preset has exactly those shapes (Meta's multiple_of rule reproduces intermediate_size)."""
    shapes = HF_SHAPES[preset]
    assert count_from_hf_shapes(*shapes) == PUBLISHED_PARAM_COUNTS[preset]
    cfg = load_model_config(preset)
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim) == shapes
    assert not cfg.tie_embeddings


def test_published_ffn_sizes():
    assert load_model_config("llama2-70b").hidden_dim == 28672
    assert load_model_config("llama3-8b").hidden_dim == 14336
    assert load_model_config("llama1-65b").hidden_dim == 22016


def test_every_preset_loads():
    names = model_preset_names()
    assert {"tiny", "llama1-7b", "llama2-7b", "llama2-13b", "llama3.1-8b"} <= set(names)
    for name in names:
        load_model_config(name)


def test_overrides_apply_with_yaml_types():
    cfg = load_model_config("tiny", ["n_layers=2", "dtype=float32", "rope_theta=500000", "tie_embeddings=true"])
    assert (cfg.n_layers, cfg.dtype, cfg.rope_theta, cfg.tie_embeddings) == (2, "float32", 500000.0, True)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    # YAML 1.1 reads 1e-5 (no dot) as a string; a float field takes it as the number it is
    assert load_model_config("tiny", ["norm_eps=1e-5", "init_std=2E-2"]).norm_eps == 1e-5
    with pytest.raises(ConfigError, match="norm_eps: expected float, got str"):
        load_model_config("tiny", ["norm_eps=small"])


@pytest.mark.parametrize("overrides, message", [
    (["n_layer=2"], "unknown key n_layer"),
    (["n_layers=two"], "n_layers: expected int"),
    (["dim=250"], "dim=250 is not divisible by n_heads=4"),
    (["n_kv_heads=3"], "n_heads=4 is not divisible by n_kv_heads=3"),
    (["dtype=float8"], "dtype='float8'"),
    (["remat=some"], "remat='some'"),
    (["attention_impl=flash"], "attention_impl='flash'"),
    (["rope_scaling.factor=-1"], "rope_scaling.factor must be > 0"),
    (["rope_scaling.bogus=1"], "unknown key rope_scaling.bogus"),
    (["tie_embeddings=3"], "tie_embeddings: expected bool"),
])
def test_bad_configs_are_rejected_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_model_config("tiny", overrides)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown model preset 'llama9'.*tiny"):
        load_model_config("llama9")


def test_from_dict_requires_mapping_for_nested():
    with pytest.raises(ConfigError, match="rope_scaling: expected a mapping"):
        from_dict(ModelConfig, {"rope_scaling": 3})


def test_bad_yaml_files_and_overrides_are_one_line_errors_naming_the_file(tmp_path, capsys):
    """A YAML syntax error, non-UTF-8 bytes or a malformed override: exit 2, one line naming the file or
    the override (and the line of a syntax error), never a parser traceback."""
    from llama_jax.cli.train import main

    broken = tmp_path / "broken.yaml"
    broken.write_text("model: tiny\nsteps: [1, 2\nseq_len: 64\n")
    assert main([str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken}: invalid YAML:") and "line 3" in err and err.count("\n") == 1
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    assert main([str(latin)]) == 2
    assert capsys.readouterr().err == f"error: {latin}: not UTF-8 text (byte 12)\n"
    assert main(["steps=[1, 2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override 'steps=[1, 2': invalid YAML value:") and err.count("\n") == 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | st.text(alphabet="ab:- [],{}\n\t#'\"&*!|>%@`\\=.0123456789", max_size=120))
def test_any_bytes_as_a_training_config_load_or_raise_config_error(tmp_path_factory, data):
    """Fuzz: whatever a config file holds, loading it validates or raises ConfigError, nothing else."""
    from llama_jax.training.config import load_train_config

    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    try:
        cfg = load_train_config(path)
    except ConfigError:
        return
    assert yaml.safe_load(data) is not None  # an empty file is refused, not read as all defaults
    assert all(math.isfinite(x) for _, x in _floats(cfg))


def test_yaml_nested_too_deeply_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("steps: " + "[" * 5000 + "\n")
    with pytest.raises(ConfigError, match=f"^{path}: invalid YAML: nested too deeply$"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="invalid YAML value: nested too deeply"):
        parse_override("steps=" + "[" * 5000)


# --- what YAML lets through: empty files, repeated keys, non-finite floats ----------------------------------

def _train(path, overrides=()):
    from llama_jax.training.config import load_train_config

    return load_train_config(path, list(overrides))


def _curate(path, overrides=()):
    from llama_jax.curate.config import load_config

    return load_config(str(path), list(overrides))


def _model(path, overrides=()):
    return load_model_config(str(path), list(overrides))


def _eval_task(path, overrides=()):
    """An eval task YAML, pointing at a real items file so that only the YAML can fail."""
    from llama_jax.evaluation.suite import load_task_file

    assert not overrides
    (path.parent / "items.jsonl").write_text('{"context": "1 + 1 =", "continuation": " 2"}\n')
    return load_task_file(str(path))


LOADERS = {"train": (_train, "steps: 30\nseq_len: 64\nsteps: 40\n", "optimizer:\n  peak_lr: {}\n"),
           "curate": (_curate, "output_dir: a\nsample_bytes: 10\noutput_dir: b\n", "book_dedup:\n  threshold: {}\n"),
           "model": (_model, "dim: 64\nn_layers: 2\ndim: 128\n", "norm_eps: {}\n"),
           "eval task": (_eval_task, "test: items.jsonl\ntest: other.jsonl\n", None)}


def _floats(cfg, prefix=""):
    """(dotted key, value) of every float field of a (nested) config dataclass."""
    import dataclasses

    values = [(f"{prefix}{f.name}", getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    for key, value in values:
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            where = key if i is None else f"{key}[{i}]"
            if dataclasses.is_dataclass(item):
                yield from _floats(item, f"{where}.")
            elif isinstance(item, float):
                yield where, item


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_refused_naming_it(kind, text, tmp_path):
    """An empty file used to read as `{}`: all defaults, for training a 6.7B model."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^(task empty: )?{path}: the file is empty"):
        LOADERS[kind][0](path)


@pytest.mark.parametrize("kind", LOADERS)
def test_a_repeated_key_is_refused_naming_key_file_and_line(kind, tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(LOADERS[kind][1])
    key = LOADERS[kind][1].splitlines()[0].split(":")[0]
    with pytest.raises(ConfigError, match=f"^(task twice: )?{path}: invalid YAML: duplicate key '{key}' at line [23],"):
        LOADERS[kind][0](path)


def test_repeated_keys_nested_in_overrides_and_merges():
    """Nested mappings are checked too, in files and overrides; a `<<` merge's keys may be overridden."""
    with pytest.raises(ConfigError, match="invalid YAML value: duplicate key 'peak_lr' at line 1, column 14"):
        apply_overrides({}, ["optimizer={peak_lr: 1, peak_lr: 2}"])
    import llama_jax.utils.config_io as config_io

    assert config_io._parse_yaml("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n")["use"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("kind", [k for k, v in LOADERS.items() if v[2]])
@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf", "+.Inf", "1e999"])
def test_non_finite_floats_are_refused_in_files_and_overrides(kind, value, tmp_path):
    load, _, template = LOADERS[kind]
    path = tmp_path / "c.yaml"
    path.write_text(template.format(value))
    key = ".".join(line.strip().rstrip(":").split(":")[0] for line in template.splitlines())
    with pytest.raises(ConfigError, match=f"^{key}: expected a finite number, got (nan|inf|-inf)$"):
        load(path)
    path.write_text(template.format(0.5))
    with pytest.raises(ConfigError, match=f"^{key}: expected a finite number"):
        load(path, [f"{key}={value}"])


def test_config_mistakes_through_the_train_cli_are_one_line_exit_2(tmp_path, capsys):
    from llama_jax.cli.train import main

    (tmp_path / "empty.yaml").write_text("# nothing\n")
    (tmp_path / "twice.yaml").write_text(LOADERS["train"][1])
    cases = {(str(tmp_path / "empty.yaml"),): f"{tmp_path / 'empty.yaml'}: the file is empty",
             (str(tmp_path / "twice.yaml"),): "invalid YAML: duplicate key 'steps' at line 3, column 1",
             ("optimizer.peak_lr=.nan",): "optimizer.peak_lr: expected a finite number, got nan",
             ("spikes.loss_factor=.inf",): "spikes.loss_factor: expected a finite number, got inf"}
    for argv, message in cases.items():
        assert main([*argv, f"run_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def _float_keys() -> list[str]:
    from llama_jax.training.config import load_train_config

    return sorted(key for key, _ in _floats(load_train_config()) if "[" not in key)


def _nested(values: dict) -> dict:
    """{"a.b": x} -> {"a": {"b": x}}."""
    out = {}
    for key, x in values.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = x
    return out


@settings(max_examples=200, deadline=None)
@given(values=st.dictionaries(st.sampled_from(_float_keys()), st.floats(allow_nan=True, allow_infinity=True),
                              min_size=1, max_size=4),
       duplicate=st.booleans())
def test_fuzz_float_settings_and_repeated_keys(tmp_path_factory, values, duplicate):
    """Fuzz: float settings set to any floats, in a file (its first key written twice when `duplicate`) or
    as overrides: a repeated key is a ConfigError naming it; else a non-finite value is a ConfigError (naming
    its key when it is the only setting: another may fail its range check first); a config that loads has
    only finite floats."""
    from llama_jax.training.config import load_train_config

    nested = _nested(values)
    first = next(iter(nested))
    path = tmp_path_factory.mktemp("floats") / "c.yaml"
    path.write_text(yaml.safe_dump(nested) + (yaml.safe_dump({first: nested[first]}) if duplicate else ""))
    overrides = [f"{key}={yaml.safe_dump(x).splitlines()[0]}" for key, x in values.items()]
    non_finite = [key for key, x in values.items() if not math.isfinite(x)]
    for source, load in (("file", lambda: load_train_config(path)), ("overrides", lambda: load_train_config(None, overrides))):
        try:
            cfg = load()
        except ConfigError as e:
            if duplicate and source == "file":
                assert str(e).startswith(f"{path}: invalid YAML: duplicate key '{first}' at line "), e
            elif non_finite and len(values) == 1:
                assert str(e) == f"{non_finite[0]}: expected a finite number, got {values[non_finite[0]]}"
            continue
        assert not (duplicate and source == "file") and not non_finite
        assert all(math.isfinite(x) for _, x in _floats(cfg))
