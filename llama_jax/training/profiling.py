"""Trace a window of training steps with JAX's profiler, for TensorBoard's profile tab or Perfetto.

`profile_steps` steps from `profile_start_step` on (global step numbers: a resumed run that starts past
the window traces nothing) are recorded into `run_dir/profile`, on every process (each host writes its
own `<host>.xplane.pb` there). The default start, step 3, leaves out the step that compiles. The trace
stops once the last traced step's results are back on the host, so it holds that step's device work;
traced steps run slower than the others, and the logged throughput shows it.
"""
from __future__ import annotations

from pathlib import Path

import jax


class StepProfiler:
    def __init__(self, directory: Path, start_step: int, steps: int):
        self.directory, self.start, self.steps = Path(directory), start_step, steps
        self.active = False

    def step_starting(self, step: int) -> None:
        if self.steps and step == self.start and not self.active:  # a spike rollback can repeat a step
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def step_finished(self, step: int) -> None:
        """Call once the step's results have been fetched (the device work is done)."""
        if self.active and step >= self.start + self.steps - 1:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
