"""The training loop, in process: learning, exact resume, NaN guard, init_from, errors before compiling.

Oracles: an uninterrupted run for resume; the train step's own loss on the saved weights for
init_from; the data itself (a templated corpus a model must learn) for "loss decreases".
The helpers at the top (a tiny corpus, a 300-piece tokenizer, a dim-32 2-layer fp32 config) are shared
with the subprocess tests in test_train_recovery.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.utils.config_io import ConfigError
from llama_jax.training.config import load_train_config
from llama_jax.training.loop import TrainingDiverged, train

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 300


def write_corpus(directory: Path) -> tuple[Path, Path]:
    """Train and validation text files (a few hundred KB in all), deterministic."""
    rng = np.random.default_rng(0)
    animals = ["cat", "dog", "fox", "owl", "bee", "cow", "yak", "elk"]
    verbs = ["sees", "likes", "chases", "follows", "greets", "feeds"]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n_docs in (("train", 60), ("validation", 4)):
        split_dir = directory / split
        split_dir.mkdir(exist_ok=True)
        for d in range(n_docs):
            lines = [f"the {animals[a]} {verbs[v]} the {animals[b]} number {n}."
                     for a, v, b, n in rng.integers(0, [8, 6, 8, 100], size=(40, 4))]
            (split_dir / f"doc{d:03d}.txt").write_text("\n".join(lines) + "\n")
        paths.append(split_dir)
    return paths[0], paths[1]


def prepare(directory: Path) -> dict:
    """Corpus + tokenizer under `directory`; returns the config overrides that point at them."""
    from llama_jax.data.tokenizer import train_sentencepiece

    train_dir, val_dir = write_corpus(directory / "corpus")
    tokenizer = directory / "tok.model"
    if not tokenizer.exists():
        train_sentencepiece(sorted(str(p) for p in train_dir.iterdir()), VOCAB, str(directory / "tok"))
    return {"train_dir": str(train_dir), "val_dir": str(val_dir), "tokenizer": str(tokenizer)}


def overrides(paths: dict, run_dir: Path, **extra) -> list[str]:
    """`key=value` overrides for a tiny fp32 run on the prepared corpus."""
    values = {
        "model": "tiny", "model.vocab_size": VOCAB, "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4,
        "model.ffn_hidden_dim": 64, "model.max_seq_len": 32, "model.dtype": "float32",
        "model.attention_impl": "xla",
        "data.sources": f"[{{kind: text, path: {paths['train_dir']}}}]",
        "data.validation_sources": f"[{{kind: text, path: {paths['val_dir']}}}]",
        "tokenizer": paths["tokenizer"], "run_dir": str(run_dir), "steps": 30, "global_batch_size": 4,
        "seq_len": 32, "log_every": 1, "eval_every": 0, "checkpoint_every": 3, "keep_checkpoints": 5,
        "optimizer.peak_lr": 1e-2, "optimizer.warmup_steps": 2, "progress": "lines",
        "async_checkpointing": True,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def losses_from_jsonl(run_dir: Path) -> dict[int, float]:
    """{step: loss} of the train records of a run's metrics.jsonl (log_every=1: one loss per step)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes")


def persistent_compilation_cache(directory: Path):
    """Generator for a fixture: JAX's on-disk compilation cache in `directory`, previous settings restored."""
    from jax.experimental.compilation_cache import compilation_cache

    previous = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
    for name, value in zip(CACHE_OPTIONS, (str(directory), 0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield str(directory)
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def child_env() -> dict:
    """Environment of a child process: CPU, the same matmul precision as the tests (so compiled programs
    are shared through the on-disk cache), every program cached."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_python(code: str, *args: str, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter at the repository root (own devices, own signal handlers)."""
    env = {**child_env(), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Identical programs compile once per module (the runs below rebuild the same steps many times)."""
    yield from persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("train_corpus"))


def run_in_process(corpus, run_dir, **extra):
    """One training invocation in this process on the tiny config (extra: config overrides)."""
    return train(load_train_config(None, overrides(corpus, run_dir, **extra)))


def test_loss_decreases_and_metrics_are_written(corpus, tmp_path):
    result = run_in_process(corpus, tmp_path / "run", log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10, profile_steps=2, profile_start_step=4)
    assert result.status == "completed" and len(result.losses) == 30
    assert np.mean(result.losses[-5:]) < result.losses[0] - 1.5, result.losses  # ln(300) ≈ 5.7 at start
    val = result.validation
    assert val["loss"] < result.losses[0] - 1.5 and val["bits_per_byte"] > 0
    assert val["bytes"] == sum(p.stat().st_size for p in Path(corpus["val_dir"]).iterdir())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu_cpu_measured"):
        assert all(np.isfinite(r[key]) for r in train_records), key
    assert all(0 < r["mfu_cpu_measured"] <= 1 and "mfu" not in r for r in train_records)  # a CPU: measured peak
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    traces = list((tmp_path / "run" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and b"jit_train_step" in traces[0].read_bytes()  # steps 4-5, one trace
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == Path(corpus["tokenizer"]).read_bytes()
    saved = load_train_config(tmp_path / "run" / "config.yaml")  # the resolved config reloads as is
    assert saved.model.dim == 32 and saved.steps == 30 and saved.log_every == 5


def test_resume_reproduces_an_uninterrupted_run_bitwise(corpus, tmp_path, capsys):
    """... and its metrics.jsonl reads as one run, also when the first run was killed while writing a
    record (a torn last line: dropped with one warning); a line that is not a record stops the resume
    with one line naming the file and line (exit 2), the file untouched."""
    from llama_jax.cli.train import main

    whole = run_in_process(corpus, tmp_path / "whole", stop_at_step=6)
    first = run_in_process(corpus, tmp_path / "split", stop_at_step=3)
    assert first.status == "stopped" and first.last_step == 3
    metrics = tmp_path / "split" / "metrics.jsonl"
    kept = metrics.read_text()
    torn = '{"step": 4, "kind": "train", "lo'
    metrics.write_text(kept + torn)
    capsys.readouterr()
    second = run_in_process(corpus, tmp_path / "split", stop_at_step=6)
    assert (second.first_step, second.last_step, second.status) == (4, 6, "stopped")
    assert first.losses + second.losses == whole.losses  # exact equality of fp32 values
    assert losses_from_jsonl(tmp_path / "split") == losses_from_jsonl(tmp_path / "whole")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [f"warning: {metrics}:{kept.count(chr(10)) + 1}: dropped the last line, a record cut short "
                        f"by an interrupted write ({len(torn)} bytes, no newline)"]
    lines = metrics.read_text().splitlines()
    for garbage, problem in (("\x00\x00\x00", "not JSON (Expecting value)"), ("[3]", "a JSON list")):
        metrics.write_text("\n".join([*lines[:2], garbage, *lines[2:]]) + "\n")
        assert main(overrides(corpus, tmp_path / "split", stop_at_step=9)) == 2
        assert capsys.readouterr().err == (f"error: {metrics}:3: not a metrics record ({problem}; expected a JSON "
                                           f"object with an integer step): fix or delete that line\n")
        assert metrics.read_text().splitlines()[2] == garbage


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    from llama_jax.checkpoint.run import RunCheckpoints

    with pytest.raises(TrainingDiverged, match=r"step \d+: the loss \(.*\) or gradient norm \(.*\) is not finite") as err:
        run_in_process(corpus, tmp_path / "run", checkpoint_every=1, **{"optimizer.peak_lr": "1.0e+30",
                                                                       "optimizer.warmup_steps": 0})
    bad_step = int(err.value.args[0].split(":")[0].split()[1])
    assert "nan" in str(err.value) or "inf" in str(err.value)
    ckpts = RunCheckpoints(tmp_path / "run", keep=5)
    assert ckpts.latest_step() == bad_step - 1 and f"step {bad_step - 1}" in str(err.value)
    ckpts.close()
    from llama_jax.checkpoint.params import load_params

    params = load_params(tmp_path / "run", load_train_config(tmp_path / "run" / "config.yaml").model)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# A configured peak per device far above this CPU's rate (so the MFU is never capped at 1).
CONFIGURED_PEAK = 1e13


@pytest.fixture(scope="module")
def options_run(corpus, tmp_path_factory):
    """One completed 8-step run exercising shipped options: a checkpoint every 2 steps with
    keep_checkpoints=2 and keep_period=4, a configured peak_flops_per_device, every step logged, the
    final validation pass. Returns (run_dir, TrainResult)."""
    run_dir = tmp_path_factory.mktemp("options") / "run"
    result = run_in_process(corpus, run_dir, steps=8, checkpoint_every=2, keep_checkpoints=2, keep_period=4,
                            peak_flops_per_device=CONFIGURED_PEAK, log_every=1)
    assert result.status == "completed" and result.last_step == 8
    return run_dir, result


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_keep_checkpoints_and_keep_period_prune_as_documented(options_run):
    """docs/training.md: "the last `keep_checkpoints` are kept, plus every multiple of `keep_period`"."""
    run_dir, _ = options_run
    saved = range(2, 9, 2)  # checkpoint_every=2, steps=8
    expected = set(list(saved)[-2:]) | {s for s in saved if s % 4 == 0}
    on_disk = {int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()}
    assert on_disk == expected == {4, 6, 8}
    records = {int(p.stem) for p in (run_dir / "checkpoint_integrity").glob("*.json")}
    assert records == on_disk  # a pruned step's integrity record goes with it


def test_configured_peak_gives_mfu_and_throughput_is_tokens_over_step_time(options_run):
    """MFU = model FLOPs/token (counted by hand from the run's shapes) × tokens/s ÷ the configured peak
    (one device), logged as `mfu`; tokens/s = the step's 4 × 32 tokens ÷ the logged step time, and the step
    time is measured inside the wall-clock time between consecutive log records (log_every=1) and makes
    up most of it (the rest: writing the records)."""
    run_dir, _ = options_run
    dim, layers, hidden, vocab, seq = 32, 2, 64, VOCAB, 32  # overrides(): 4 heads, no grouped queries
    flops_per_token = 6 * (layers * (4 * dim * dim + 3 * dim * hidden) + vocab * dim) + 12 * layers * dim * seq
    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    timed = records[1:]  # step 1 compiled: its window has no timing
    assert "tokens_per_s" not in records[0]
    for r in timed:
        assert "mfu_cpu_measured" not in r
        assert r["mfu"] == pytest.approx(flops_per_token * r["tokens_per_s"] / CONFIGURED_PEAK, rel=1e-12)
        assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_time_s"], rel=1e-12)
    gaps = np.diff([r["time"] for r in records])  # `time` is rounded to 1 ms
    logged = np.array([r["step_time_s"] for r in timed])
    assert (logged <= gaps + 0.002).all() and logged.sum() >= 0.6 * gaps.sum(), (gaps, logged)


def read_events(path: Path) -> list:
    """The `Event` protos of a TensorBoard event file, read without TensorBoard: TFRecord framing (length,
    its masked CRC-32C, the record, its masked CRC-32C), each checked, around `Event` protos (the proto
    definitions and the checksum tensorboardX ships)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
        header, (length,) = data[offset:offset + 8], struct.unpack_from("<Q", data, offset)
        record = data[offset + 12:offset + 12 + length]
        assert struct.unpack_from("<II", data[offset + 8:offset + 12] + data[offset + 12 + length:][:4]) == (
            masked_crc32c(header), masked_crc32c(record)), f"{path}: bad checksum at byte {offset}"
        events.append(Event.FromString(record))
        offset += 12 + length + 4
    assert offset == len(data), f"{path}: truncated record"
    return events


def read_scalar_events(directory: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the TensorBoard event files in `directory` (`read_events`)."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in read_events(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_holds_the_losses_of_metrics_jsonl(options_run):
    """The same loss per step in both logs (TensorBoard stores float32), and the final validation too."""
    run_dir, result = options_run
    scalars = read_scalar_events(run_dir / "tensorboard")
    jsonl = losses_from_jsonl(run_dir)
    assert sorted(jsonl) == list(range(1, 9))
    assert scalars["train/loss"] == {step: float(np.float32(loss)) for step, loss in jsonl.items()}
    assert scalars["train/mfu"][8] == float(np.float32(train_records(run_dir)[-1]["mfu"]))
    assert scalars["final_eval/bits_per_byte"] == {8: float(np.float32(result.validation["bits_per_byte"]))}


def test_validation_bits_per_byte_and_the_gzip_baseline(corpus, options_run):
    """Bits per byte = nats/token × tokens/bytes ÷ ln 2, the bytes being the validation files' own; the
    gzip -9 baseline is what the `gzip` program itself achieves on the same bytes (its own deflate, not
    Python's zlib: within 0.5%)."""
    _, result = options_run
    v = result.validation
    files = sorted(Path(corpus["val_dir"]).iterdir())
    text = b"".join(f.read_bytes() for f in files)
    assert v["bytes"] == len(text)
    assert v["bits_per_byte"] == pytest.approx(v["loss"] * v["tokens"] / v["bytes"] / np.log(2), rel=1e-12)
    gzip_cli = subprocess.run(["gzip", "-9", "-c", "-n"], input=text, capture_output=True, check=True).stdout
    assert v["gzip9_bits_per_byte"] == pytest.approx(8 * len(gzip_cli) / len(text), rel=5e-3)


@pytest.mark.slow
def test_the_default_run_beats_gzip(tmp_path):
    """README: `python train.py` (configs/train/default.yaml: the `tiny` model, vocab 8000, 400 steps of
    8 × 256 tokens of the built-in corpus) ends with validation bits per byte below gzip -9's on the same
    text. Run as stated, only its output and cache directories moved under tmp_path (so the built-in
    tokenizer and the token cache are built afresh). About 100 s on 2 quiet cores (tokenizer, tokenizing,
    400 steps), the longest test in CI. Oracle for the baseline: the `gzip` program on the validation
    text."""
    from llama_jax.data import validation_text

    args = [f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", f"data.cache_dir={tmp_path / 'tokens'}"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = re.search(r"^validation \(([\d,]+) bytes, [\d,]+ tokens\): loss \S+ \| (\S+) bits/byte \| "
                     r"gzip -9: (\S+) bits/byte$", proc.stdout, re.M)
    assert line, proc.stdout[-3000:]
    text = validation_text(load_train_config(None, args).data)
    assert int(line.group(1).replace(",", "")) == len(text)
    gzip_cli = subprocess.run(["gzip", "-9", "-c", "-n"], input=text, capture_output=True, check=True).stdout
    assert float(line.group(3)) == pytest.approx(8 * len(gzip_cli) / len(text), rel=5e-3)
    assert float(line.group(2)) < float(line.group(3)), line.group(0)


def saved_weights(corpus, tmp_path) -> tuple[dict, float]:
    """Random weights saved as a params dir at tmp_path/weights, and the loss of the run's first batch
    under them, computed outside the loop (the oracle of a run started from them)."""
    from llama_jax.checkpoint.params import save_params
    from llama_jax.data import DataConfig, SourceConfig, make_train_iterator
    from llama_jax.data.tokenizer import load_tokenizer
    from llama_jax.model.api import init_params
    from llama_jax.training.step import batch_nll

    cfg = load_train_config(None, overrides(corpus, tmp_path / "run"))
    params = init_params(cfg.model, seed=123)
    save_params(tmp_path / "weights", params, cfg.model)
    data = make_train_iterator(DataConfig(sources=[SourceConfig(kind="text", path=corpus["train_dir"])]),
                               load_tokenizer(corpus["tokenizer"]), seq_len=32, global_batch_size=4)
    nll, tokens = batch_nll(cfg.model, params, next(data))
    return params, float(nll / tokens)


def test_init_from_starts_from_the_given_weights_with_a_fresh_optimizer(corpus, tmp_path):
    _, first_loss = saved_weights(corpus, tmp_path)
    result = run_in_process(corpus, tmp_path / "run", stop_at_step=2, init_from=str(tmp_path / "weights"))
    assert result.first_step == 1  # step 0: a fresh start, not a resume
    assert result.losses[0] == pytest.approx(first_loss, rel=1e-6)
    # a checkpoint of another shape is refused, naming the parameter and both shapes
    with pytest.raises(ValueError, match=r"parameter layers\.attention\.wk\.kernel has shape \(2, 32, 32\), "
                                         r"the config expects \(2, 48, 48\)"):
        run_in_process(corpus, tmp_path / "other", stop_at_step=2, init_from=str(tmp_path / "weights"), **{"model.dim": 48})


def test_init_from_a_run_directory_takes_its_final_params_with_fresh_data_and_optimizer(corpus, options_run, tmp_path):
    """docs/training.md: a run directory as `init_from` gives "its latest params" and "a fresh optimizer at
    step 0". Oracles: the first loss is the loss of the data's *first* batch under the source's final
    (step 8) params, computed outside the loop; and two steps equal, bitwise, a run started from those
    params saved as a params directory (the path tested above with a fresh optimizer), so no optimizer
    moment, step count or data position of the source carries over."""
    import orbax.checkpoint as ocp

    from llama_jax.checkpoint.params import save_params
    from llama_jax.data import DataConfig, SourceConfig, make_train_iterator
    from llama_jax.data.tokenizer import load_tokenizer
    from llama_jax.training.step import batch_nll

    source, _ = options_run
    cfg = load_train_config(source / "config.yaml").model
    final = ocp.StandardCheckpointer().restore(source / "checkpoints" / "8" / "params")  # plain orbax, step 8
    final = jax.tree.map(np.asarray, final)
    save_params(tmp_path / "final", final, cfg)
    data = make_train_iterator(DataConfig(sources=[SourceConfig(kind="text", path=corpus["train_dir"])]),
                               load_tokenizer(corpus["tokenizer"]), seq_len=32, global_batch_size=4)
    mean_nll = jax.jit(lambda params, batch: jnp.divide(*batch_nll(cfg, params, batch)))
    first = float(mean_nll(final, next(data)))
    for _ in range(8):
        later = next(data)  # the batch the source would have trained on next
    from_run = run_in_process(corpus, tmp_path / "from_run", stop_at_step=2, init_from=str(source))
    from_params = run_in_process(corpus, tmp_path / "from_params", stop_at_step=2, init_from=str(tmp_path / "final"))
    assert from_run.first_step == 1 and from_run.losses[0] == pytest.approx(first, rel=1e-6)
    assert abs(float(mean_nll(final, later)) - first) > 1e-3  # batch 1, not batch 9
    assert from_run.losses == from_params.losses and len(from_run.losses) == 2
    assert losses_from_jsonl(tmp_path / "from_run") == losses_from_jsonl(tmp_path / "from_params")
    opt_state = ocp.StandardCheckpointer().restore(tmp_path / "from_run" / "checkpoints" / "2" / "opt_state")
    counts = [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
              if "count" in jax.tree_util.keystr(path)]
    assert counts and set(counts) == {2}  # AdamW's step counters: two updates, none of the source's eight


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_init_from_reads_meta_and_hugging_face_directories(corpus, tmp_path, fmt):
    """No conversion step: the same weights written as a Meta or HF directory start the same run."""
    from llama_jax.convert import convert

    _, first_loss = saved_weights(corpus, tmp_path)
    convert(tmp_path / "weights", tmp_path / fmt, to=fmt, progress=False)
    result = run_in_process(corpus, tmp_path / "run", stop_at_step=1, init_from=str(tmp_path / fmt))
    assert result.first_step == 1 and result.losses[0] == pytest.approx(first_loss, rel=1e-6)
    message = (f"{tmp_path / fmt}: parameter layers.attention.wk.kernel has shape (2, 32, 32), "
               f"the config expects (2, 48, 48)")
    with pytest.raises(ValueError, match=re.escape(message)):
        run_in_process(corpus, tmp_path / "other", stop_at_step=1, init_from=str(tmp_path / fmt), **{"model.dim": 48})


def _no_compile(monkeypatch):
    """Make any attempt to build the train step fail: errors must come before compilation."""
    from llama_jax.training import initial_state, trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the train step was built before the error was reported")

    monkeypatch.setattr(trainer, "jit_train_step", refuse)
    monkeypatch.setattr(initial_state, "create_train_state", refuse)


@pytest.mark.parametrize("override, message", [
    ({"stepz": 3}, r"unknown key stepz"),
    ({"seq_len": 64}, r"seq_len=64 exceeds model.max_seq_len=32"),
    ({"global_batch_size": 6, "micro_batches": 4}, r"global_batch_size=6 is not divisible by micro_batches=4"),
    ({"optimizer.peak_lr": -1.0}, r"optimizer.peak_lr must be > 0"),
    ({"model.dim": 30}, r"dim=30 is not divisible by n_heads=4"),
    ({"model.vocab_size": 512}, r"vocab_size 300 but the model's vocab_size is 512"),
    ({"mesh.fsdp": 3}, r"mesh .* uses 3 devices, but there are 1"),
    ({"profile_steps": 2, "profile_start_step": 0}, r"profile_start_step must be > 0, got 0"),
    ({"profile_steps": 2, "profile_start_step": 31}, r"profile_start_step=31 is beyond steps=30"),
])
def test_bad_configs_fail_before_compiling(corpus, tmp_path, monkeypatch, override, message):
    _no_compile(monkeypatch)
    with pytest.raises((ConfigError, ValueError), match=message):
        run_in_process(corpus, tmp_path / "run", **override)


def test_a_lone_surrogate_in_jsonl_data_is_one_line_exit_2_before_compiling(corpus, tmp_path, monkeypatch, capsys):
    """Valid JSON, but `\\udcff` decodes to a string with no UTF-8 form: the tokenizer's TypeError
    traceback before, now the file and line."""
    from llama_jax.cli.train import main

    _no_compile(monkeypatch)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat sees the dog."}\n{"text": "the owl \\udcff"}\n')
    assert main(overrides(corpus, tmp_path / "run", **{"data.sources": f"[{{kind: jsonl, path: {data}}}]"})) == 2
    assert capsys.readouterr().err == (f"error: {data}:2: text: a lone surrogate U+DCFF at character 8 (not Unicode "
                                       f"text); set skip_bad_lines to skip such lines\n")


def test_unwritable_run_dir_fails_before_compiling(corpus, tmp_path, monkeypatch):
    _no_compile(monkeypatch)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run_dir .*file/run is not writable"):
        run_in_process(corpus, tmp_path / "file" / "run")


def test_checkpoint_of_another_shape_fails_before_compiling(corpus, tmp_path, monkeypatch):
    run_in_process(corpus, tmp_path / "run", stop_at_step=3)
    _no_compile(monkeypatch)
    with pytest.raises(ConfigError, match=r"holds a run with model.ffn_hidden_dim=64, this config has 96"):
        run_in_process(corpus, tmp_path / "run", stop_at_step=3, **{"model.ffn_hidden_dim": 96})
    (tmp_path / "run" / "config.yaml").unlink()  # without the config, the checkpoint's own shapes decide
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoints/3: parameter layers.feed_forward.w1.kernel "
                                         r"has shape \(2, 32, 64\), the config expects \(2, 32, 96\)"):
        run_in_process(corpus, tmp_path / "run", stop_at_step=3, **{"model.ffn_hidden_dim": 96})


def test_cudnn_on_a_cpu_is_a_one_line_configuration_error_before_compiling(corpus, tmp_path, capsys, monkeypatch):
    """`attention_impl: cudnn` on this CPU: exit 2 and one line naming the platform, before the train step
    is built (it was jax's "cuDNN is not detected" RuntimeError and a traceback from inside the compile)."""
    from llama_jax.cli.train import main

    _no_compile(monkeypatch)
    assert main(overrides(corpus, tmp_path / "run", **{"model.attention_impl": "cudnn"})) == 2
    assert capsys.readouterr().err == ("error: attention_impl='cudnn' runs only on an NVIDIA GPU, but this "
                                       "program targets cpu: use auto or xla\n")


def test_command_line_rejects_unknown_arguments():
    for args, message in ((["--lr", "3"], "unexpected argument '--lr'"), (["bogus"], "unexpected argument 'bogus'")):
        proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_model_override_picks_a_preset_and_fields_apply_on_top():
    cfg = load_train_config(None, ["model=llama1-65b", "model.n_layers=2", "seq_len=128"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads) == (8192, 2, 64)
    with pytest.raises(ConfigError, match="unknown model preset 'llama9'"):
        load_train_config(None, ["model=llama9"])
