"""What a training run reports: FLOPs and MFU, and where the numbers go (JSONL, TensorBoard, terminal).

Model FLOPs per trained token are the model's to say (`ModelConfig.flops_per_token`, the PaLM paper's
6·N + 12·n_layers·dim·seq_len). MFU = achieved model FLOP/s / (devices × peak FLOP/s per device); the
peak and its caveats are in `llama_jax.training.peak`.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from llama_jax.training.config import TrainConfig
from llama_jax.training.peak import job_peak
from llama_jax.training.tensorboard_events import ScalarEventWriter


class Window:
    """Losses and timing since the last log line: mean loss, tokens/s, step time and MFU.

    The first step of an invocation includes compilation, so timing starts when it ends.
    """

    def __init__(self, cfg: TrainConfig):
        self._tokens_per_step = cfg.global_batch_size * cfg.seq_len
        self._peak = job_peak(jax.devices()[0], jax.device_count(), cfg.model.dtype, cfg.peak_flops_per_device)
        self._flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
        self._losses, self._start, self._steps = [], None, 0

    def add(self, loss: float) -> bool:
        """Record a finished step; True for the invocation's first (compiling) step."""
        self._losses.append(loss)
        if self._start is None:
            self._start = time.perf_counter()
            return True
        self._steps += 1
        return False

    def mean_loss(self) -> float:
        return float(np.mean(self._losses))

    def throughput(self) -> dict:
        if not self._steps:
            return {}
        elapsed = time.perf_counter() - self._start
        tokens_per_s = self._steps * self._tokens_per_step / elapsed
        values = {"tokens_per_s": tokens_per_s, "step_time_s": elapsed / self._steps}
        if self._peak is not None:
            values[self._peak.key] = self._peak.mfu(self._flops_per_token * tokens_per_s)
        return values

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (evaluation) out of the throughput."""
        if self._start is not None:
            self._start += seconds

    def reset(self) -> None:
        self._losses, self._start, self._steps = [], time.perf_counter(), 0


class MetricsFileError(ValueError):
    """An existing `metrics.jsonl` holds a line that is not one of our records; the message names file:line."""


class MetricsLog:
    """One JSON object per line in `run_dir/metrics.jsonl` and TensorBoard events in `run_dir/tensorboard`.

    Only the main process writes (pass `enabled=False` elsewhere). On resume, records past the restored
    step are dropped first, so the file always reads as one run without repeated steps. The file is
    read strictly then (see `read_records`): a record cut short by a killed job is dropped with a
    warning (`say`), anything else that is not a record stops the run.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int, say=print):
        self.enabled = enabled
        self._file = self._writer = None
        if not enabled:
            return
        self._run_dir, self._say = run_dir, say
        self._open(resume_step)

    def _open(self, resume_step: int) -> None:
        path = self._run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line, record in read_records(path, self._say) if record["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")
        self._writer = ScalarEventWriter(self._run_dir / "tensorboard", purge_step=resume_step + 1)

    def rewind(self, step: int) -> None:
        """Forget the records after `step` (training was rolled back to it), as a resume from it would."""
        if self.enabled:
            self.close()
            self._open(step)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: say which file (the OSError of a write names none)
            raise OSError(e.errno, e.strerror, self._file.name) from None
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{kind}/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()


def read_records(path: Path, say) -> list[tuple[str, dict]]:
    """(line, record) for each non-blank line of an existing `metrics.jsonl`.

    Each record is written as one line ending in a newline, so a job killed mid-write leaves at most a
    last line without its newline; if that line is not JSON it is such a torn record, dropped with one
    warning. Any other line that is not a JSON object with an integer `step` (hand edits, another
    program's output, disk damage) is a MetricsFileError naming the file and line: guessing what it
    meant would rewrite the run's history.
    """
    *lines, last = path.read_bytes().split(b"\n")  # `last` is b"" when the file ends with a newline
    records = []
    for number, raw in enumerate([*lines, last] if last.strip() else lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            record = json.loads(text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if number > len(lines):  # the last line, without its newline
                say(f"warning: {path}:{number}: dropped the last line, a record cut short by an interrupted "
                    f"write ({len(raw)} bytes, no newline)")
                continue
            problem = f"not JSON ({getattr(e, 'msg', None) or type(e).__name__})"
        else:
            if isinstance(record, dict) and type(record.get("step")) is int:
                records.append((text, record))
                continue
            problem = (f"a JSON {type(record).__name__}" if not isinstance(record, dict)
                       else f"its step is {record.get('step')!r}")[:80]
        raise MetricsFileError(f"{path}:{number}: not a metrics record ({problem}; expected a JSON object with "
                               f"an integer step): fix or delete that line")
    return records


def format_values(values: dict) -> str:
    """`loss 3.2104 | lr 3.0e-04 | ...` for log lines and the progress bar."""
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            text = f"{value:.2e}" if key in ("lr",) or (value and abs(value) < 1e-3) else f"{value:,.4g}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


class Progress:
    """A tqdm bar (steps, loss, tokens/s, ETA) on a terminal; plain `step N/M ...` lines otherwise."""

    def __init__(self, *, enabled: bool, mode: str, start: int, total: int):
        self.enabled = enabled
        use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self._bar = None
        self.total = total
        if enabled and use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, values: dict, *, log: bool) -> None:
        """Advance to `step`; on log steps, show the values (bar postfix or a log line)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if log:
                self._bar.set_postfix_str(format_values(
                    {k: values[k] for k in ("loss", "tokens_per_s") if k in values}), refresh=True)
        elif log:
            print(f"step {step}/{self.total} | {format_values(values)}", flush=True)

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
