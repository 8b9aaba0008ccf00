"""The MFU denominator: peak matmul FLOP/s per device, from a datasheet or, on a CPU, measured.

GPUs and TPUs: the vendor's dense bf16 figure for the device's `jax.Device.device_kind` (`DATASHEET`).
CPUs differ too much for a table, so their peak is measured: what a jitted 2048² matmul reaches in the
run's compute dtype (≈ 190 / 370 GFLOP/s fp32 / bf16 on a 2-core AMD EPYC Zen 4, ≈ 230 / 1,000 on a
2-core Intel Xeon with AMX; XLA sees the whole CPU as one device). A CPU is often shared, and a peak
measured while another program was busy is too low, making every later MFU too high (`mfu 1.016` was
printed that way). Hence: the best of several short measurements, not one; re-measured whenever an MFU
would exceed 1; and never below a rate the run itself has reached, so the MFU is at most 1 by
construction. Such an MFU is relative to a measurement, not a datasheet, and is reported under its own
name, `mfu_cpu_measured`.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp

# Dense (no sparsity) bf16 matmul FLOP/s per JAX device, by a lower-case substring of `device_kind`,
# most specific first. GPUs as NVIDIA's datasheets give them; TPUs per chip (one JAX device; v4 and v5p
# join their two TensorCores as one device).
DATASHEET: tuple[tuple[str, float], ...] = (
    ("h200 nvl", 835e12),
    ("h200", 989e12),  # "NVIDIA H200" (SXM)
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # "NVIDIA H100 80GB HBM3" (SXM)
    ("a100", 312e12),  # SXM and PCIe alike
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
)


def datasheet_peak(device_kind: str) -> float | None:
    """The table's FLOP/s for `device_kind`, or None for a kind it does not know."""
    kind = device_kind.lower()
    return next((flops for key, flops in DATASHEET if key in kind), None)


def measured_matmul_peak(dtype: str, n: int = 2048, reps: int = 7) -> float:
    """FLOP/s of a jitted n×n matmul of `dtype` on the default device: the best of `reps` single runs
    (a busy moment slows some runs; the fastest is the closest to what the device can do)."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.dtype(dtype)) for i in range(2))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Peak:
    """The job's peak FLOP/s (per device × devices) and the MFU of an achieved rate against it.

    `measure` (CPUs) re-takes the per-device peak when an MFU would exceed 1; a measured peak is then
    raised to the achieved rate if still below it. A fixed peak (datasheet, or `peak_flops_per_device`
    in the config) is never changed: an MFU above 1 there means a wrong figure, and is shown as 1.
    """

    def __init__(self, per_device: float, devices: int, measure: Callable[[], float] | None = None):
        self.per_device, self.devices, self._measure = per_device, devices, measure

    @property
    def key(self) -> str:
        """The metric's name: `mfu` against a datasheet or configured peak, else `mfu_cpu_measured`."""
        return "mfu" if self._measure is None else "mfu_cpu_measured"

    def mfu(self, flops_per_s: float) -> float:
        """Achieved FLOP/s (whole job) as a fraction of the peak, at most 1."""
        if flops_per_s > self.per_device * self.devices and self._measure is not None:
            self.per_device = max(self.per_device, self._measure(), flops_per_s / self.devices)
        return min(flops_per_s / (self.per_device * self.devices), 1.0)


# The best CPU peak measured in this process, per dtype: a later job (train() called again in a notebook or
# a test) starts from it instead of spending another measurement (seconds on a busy machine).
_best_measured: dict[str, float] = {}


def _measure_cpu_peak(dtype: str) -> float:
    """A new measurement, or this process's best earlier one when that was higher."""
    _best_measured[dtype] = max(_best_measured.get(dtype, 0.0), measured_matmul_peak(dtype))
    return _best_measured[dtype]


def job_peak(device: jax.Device, devices: int, compute_dtype: str, configured: float = 0.0) -> Peak | None:
    """The Peak of a job on `devices` devices like `device`: `configured` FLOP/s per device when > 0,
    else the datasheet's, else (a CPU) measured, once per process; None for an accelerator the table does
    not know."""
    if configured:
        return Peak(configured, devices)
    if device.platform == "cpu":
        measure = lambda: _measure_cpu_peak(compute_dtype)  # noqa: E731
        return Peak(_best_measured.get(compute_dtype) or measure(), devices, measure)
    flops = datasheet_peak(device.device_kind)
    return None if flops is None else Peak(flops, devices)
