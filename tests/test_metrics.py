"""The MFU's peak: datasheet figures by device kind, a CPU's measured robustly, and an MFU that never
exceeds 1 (FLOPs per token are the model's: `test_model_facts`)."""
from __future__ import annotations

import json
import re
import time

import jax
import numpy as np
import pytest
from hypothesis import strategies as st

from fuzzing import fast_and_slow
from llama_jax.training.metrics import MetricsFileError, MetricsLog, read_records
from llama_jax.training.peak import Peak, datasheet_peak, job_peak


# `jax.Device.device_kind` as each part reports it -> the vendor's dense bf16 TFLOP/s (datasheets).
VENDOR_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835,
    "NVIDIA H200": 989, "NVIDIA H200 NVL": 835, "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100 80GB PCIe": 312,
    "TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5": 459, "TPU v5p": 459,
    "TPU v6 lite": 918, "TPU v6e": 918,
}


@pytest.mark.parametrize("kind", VENDOR_TFLOPS)
def test_datasheet_peak_by_device_kind(kind):
    assert datasheet_peak(kind) == VENDOR_TFLOPS[kind] * 1e12


def test_unknown_accelerator_has_no_peak_and_a_configured_one_wins():
    class Device:
        platform, device_kind = "gpu", "NVIDIA RTX 9090"
    assert datasheet_peak(Device.device_kind) is None and job_peak(Device, 8, "bfloat16") is None
    peak = job_peak(Device, 8, "bfloat16", configured=100e12)
    assert (peak.key, peak.mfu(400e12)) == ("mfu", 0.5)


def test_a_fixed_peak_never_gives_an_mfu_above_one():
    peak = Peak(100.0, devices=2)
    assert peak.mfu(100.0) == 0.5 and peak.mfu(500.0) == 1.0 and peak.per_device == 100.0


def test_a_measured_peak_is_retaken_when_an_mfu_would_exceed_one():
    """The first measurement caught a busy moment (50); the re-measurement finds the real peak (200)."""
    measurements = iter([200.0])
    peak = Peak(50.0, devices=1, measure=lambda: next(measurements))
    assert peak.key == "mfu_cpu_measured"
    assert peak.mfu(100.0) == 0.5 and peak.per_device == 200.0
    assert peak.mfu(40.0) == 0.2  # no re-measurement below the peak (the iterator is exhausted)


def test_a_measured_peak_is_never_below_an_achieved_rate():
    peak = Peak(50.0, devices=2, measure=lambda: 60.0)
    assert peak.mfu(150.0) == 1.0 and peak.per_device == 75.0
    assert peak.mfu(75.0) == 0.5


def test_cpu_peak_is_the_best_of_several_runs_and_agrees_with_numpy():
    """Oracle: numpy's best 2048² fp32 matmul of five, within 4× (different BLAS, same machine)."""
    cpu = jax.devices("cpu")[0]
    peak = job_peak(cpu, 1, "float32")
    assert peak.key == "mfu_cpu_measured" and peak.per_device > 0
    a = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)
    a @ a
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    numpy_rate = 2 * 2048**3 / best
    assert numpy_rate / 4 < peak.per_device < numpy_rate * 4, (peak.per_device, numpy_rate)


def test_the_metrics_log_opens_tensorboard_without_importing_torch_or_changing_the_process(tmp_path):
    """tensorboardX imports torch whenever it is installed (2-3 s at every training start); the metrics log
    writes its events without it, and leaves the process as it found it: torch imports normally afterwards,
    and so does tensorboardX, seeing torch (fresh process: this one has torch loaded already). The events
    (read with tensorboardX's protos and checksum, `read_events`) hold the values, after the file version
    and a SessionLog START at the step the run goes on from (TensorBoard's purge of later steps)."""
    import subprocess
    import sys

    from test_train import read_events

    program = ("import sys\n"
               "from pathlib import Path\n"
               "from llama_jax.training.metrics import MetricsLog\n"
               f"log = MetricsLog(Path({str(tmp_path)!r}), enabled=True, resume_step=6)\n"
               "log.write(7, 'train', {'loss': 2.5, 'tokens': 4096, 'note': 'x', 'nan': float('nan')}); log.close()\n"
               "assert 'torch' not in sys.modules and 'tensorboardX' not in sys.modules\n"
               "import torch; torch.zeros(1)\n"
               "import tensorboardX.writer\n"
               "assert tensorboardX.writer.numpy_compatible is torch.Tensor, tensorboardX.writer.numpy_compatible\n")
    child = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    (events,) = (tmp_path / "tensorboard").iterdir()
    version, start, *scalars = read_events(events)
    assert (version.file_version, version.step) == ("brain.Event:2", 7)
    assert (start.session_log.status, start.step) == (start.session_log.START, 7)
    assert [(e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in scalars] == [
        (7, [("train/loss", 2.5)]), (7, [("train/tokens", 4096.0)])]
    assert all(abs(e.wall_time - events.stat().st_mtime) < 60 for e in [version, start, *scalars])


def test_a_cpu_peak_is_measured_once_per_process_and_keeps_the_best(monkeypatch):
    """A second job in the process (train() called again) reuses the measured peak; a re-measurement (an
    MFU above 1) that finds more raises it for later jobs, one that finds less does not lower it."""
    from llama_jax.training import peak as peak_module

    measurements = iter([50.0, 200.0, 120.0])
    calls = []
    monkeypatch.setattr(peak_module, "_best_measured", {})
    monkeypatch.setattr(peak_module, "measured_matmul_peak", lambda dtype: calls.append(dtype) or next(measurements))
    cpu = jax.devices("cpu")[0]
    first = job_peak(cpu, 1, "bfloat16")
    assert first.per_device == 50.0 and job_peak(cpu, 2, "bfloat16").per_device == 50.0 and len(calls) == 1
    assert first.mfu(100.0) == 0.5 and job_peak(cpu, 1, "bfloat16").per_device == 200.0  # re-taken: 200
    assert first.mfu(300.0) == 1.0 and job_peak(cpu, 1, "bfloat16").per_device == 200.0  # 120 < 200 kept
    assert calls == ["bfloat16"] * 3


# --- reading an existing metrics.jsonl back on resume ------------------------------------------------------

RECORDS = [{"step": 1, "kind": "train", "time": 1.5, "loss": 5.25}, {"step": 2, "kind": "train", "loss": float("nan")},
           {"step": 2, "kind": "eval", "val_loss": 4.0, "note": "é"}, {"step": 3, "kind": "train", "loss": 3.0}]
VALID = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


def _read(path):
    """(records, warnings) of `read_records` on `path`."""
    warnings = []
    return [record for _, record in read_records(path, warnings.append)], warnings


def _truncated(tmp_path, length):
    """A record cut short by a kill: the records before the cut come back, at most one warning names the
    file and the line; never an error (the oracle: the records whose whole JSON text is before the cut)."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(VALID[:length])
    records, warnings = _read(path)
    whole = [r for r, end in zip(RECORDS, np.cumsum([len(json.dumps(r)) + 1 for r in RECORDS])) if end - 1 <= length]
    assert json.dumps(records) == json.dumps(whole)
    lines = VALID[:length].count(b"\n")
    torn = not VALID[:length].endswith(b"\n") and len(whole) == lines  # the tail is no whole record
    assert len(warnings) == (length > 0 and torn)
    assert all(w.startswith(f"warning: {path}:{lines + 1}: dropped the last line") for w in warnings)


test_a_record_cut_anywhere_is_dropped_with_one_warning, _ = fast_and_slow(_truncated, length=st.integers(0, len(VALID)))


@pytest.mark.parametrize("lines, number, problem", [
    (["not json at all"], 2, "not JSON (Expecting value)"),
    (["[1, 2]"], 2, "a JSON list"),
    (["{\"step\": \"3\", \"kind\": \"train\"}"], 2, "its step is '3'"),
    (["{\"kind\": \"train\"}"], 2, "its step is None"),
    (["{\"step\": true}"], 2, "its step is True"),
    (["{\"step\": 4, \"kind\": \"tr"], 2, "not JSON (Unterminated string"),  # cut short, but not the last line
])
def test_a_line_that_is_not_a_record_is_an_error_naming_file_and_line(tmp_path, lines, number, problem):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS[:1])
                     + "".join(line + "\n" for line in lines).encode() + json.dumps(RECORDS[3]).encode() + b"\n")
    with pytest.raises(MetricsFileError) as error:
        _read(path)
    assert str(error.value).startswith(f"{path}:{number}: not a metrics record ({problem}")
    assert "\n" not in str(error.value)


def _any_bytes(tmp_path, data, cut):
    """Fuzz: whatever the file holds, read_records returns objects with an integer step or raises
    MetricsFileError naming file:line; and a valid file with bytes appended keeps its records."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(data)
    try:
        records, warnings = _read(path)
    except MetricsFileError as e:
        assert re.match(rf"{re.escape(str(path))}:\d+: not a metrics record \(", str(e)) and "\n" not in str(e)
    else:
        assert all(isinstance(r, dict) and type(r["step"]) is int for r in records) and len(warnings) <= 1
    path.write_bytes(VALID + data[:cut])
    try:
        records, _ = _read(path)
    except MetricsFileError as e:  # the valid records never are the line at fault
        assert int(re.match(rf"{re.escape(str(path))}:(\d+): ", str(e)).group(1)) > len(RECORDS)
    else:
        assert json.dumps(records[:len(RECORDS)]) == json.dumps(RECORDS)


test_any_bytes_read_or_name_the_line, test_any_bytes_read_or_name_the_line_many = fast_and_slow(
    _any_bytes, data=st.binary(max_size=80) | st.text(alphabet='{}[]"step:,0123 \n\\ud', max_size=60).map(str.encode),
    cut=st.integers(0, 80))


def test_the_log_rewrites_the_file_without_the_torn_line_and_later_steps(tmp_path):
    """MetricsLog on resume from step 2: the records up to step 2 stay byte for byte, the torn line and
    step 3 go, and the next write starts on a line of its own."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(VALID + b'{"step": 4, "ki')
    said = []
    log = MetricsLog(tmp_path, enabled=True, resume_step=2, say=said.append)
    log.write(3, "train", {"loss": 2.5})
    log.close()
    lines = path.read_text().splitlines()
    assert lines[:3] == VALID.decode().splitlines()[:3] and json.loads(lines[3])["loss"] == 2.5 and len(lines) == 4
    assert len(said) == 1 and said[0].startswith(f"warning: {path}:5: dropped the last line")
