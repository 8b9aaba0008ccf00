"""Quiet-run discipline: every bench says how busy the machine was, and whether its ratios count.

A ratio measured while other programs compete for the cores says more about how each framework
suffers from contention than about either (torch's threads starve sooner than XLA's: a 4.2x measured
at load average 5-6 was 1.08x on the same machine idle). So each bench runs inside `monitor()`, which
prints, before and after, the 1-minute load average and the number of CPUs busy with *other*
processes, and then one verdict line:

    load: quiet (load average 0.31 before, 1.92 after; other processes used 0.04 CPUs before, 0.10 during)
    load: loaded: ratio not valid (...)

Busy CPUs of others = (CPU time of the whole machine, from /proc/stat) - (this process's and its
finished children's CPU time), over wall time: the bench's own work is not held against it, which the
load average after the run cannot tell apart (a bench busy on both cores of a 2-core machine leaves
a load of 2 by itself). A run is loaded when the load average before it, the other processes' CPUs
just before it, or their average over the run exceeded half the cores. Only quiet runs' ratios go into
bench/RESULTS.md's headline figures.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

LOADED = "loaded: ratio not valid"
SAMPLE_SECONDS = 1.0  # how long the "before" sample of other processes' CPU use lasts


def machine_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()  # "cpu  user nice system idle iowait irq softirq steal ..."
    busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7))
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have exited."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Sample:
    wall: float
    machine: float
    own: float

    @classmethod
    def now(cls) -> "Sample":
        return cls(time.monotonic(), machine_cpu_seconds(), own_cpu_seconds())

    def others_since(self, earlier: "Sample") -> float:
        """Average CPUs other processes kept busy between `earlier` and this sample."""
        wall = max(self.wall - earlier.wall, 1e-9)
        return max(0.0, (self.machine - earlier.machine) - (self.own - earlier.own)) / wall


def verdict(cpus: int, load_before: float, others_before: float, others_during: float) -> str:
    """"quiet", or LOADED when any of the three exceeded half the cores."""
    return LOADED if max(load_before, others_before, others_during) > cpus / 2 else "quiet"


def load_average() -> float:
    return os.getloadavg()[0]


@contextlib.contextmanager
def monitor():
    """Prints the machine's load before and after the block, and the verdict line (module docstring)."""
    cpus = os.cpu_count() or 1
    load_before = load_average()
    first = Sample.now()
    time.sleep(SAMPLE_SECONDS)
    start = Sample.now()
    others_before = start.others_since(first)
    print(f"load before: 1-min load average {load_before:.2f} on {cpus} CPUs; other processes busy on "
             f"{others_before:.2f} CPUs", flush=True)
    try:
        yield
    finally:
        end = Sample.now()
        others_during = end.others_since(start)
        load_after = load_average()
        print(f"load after: 1-min load average {load_after:.2f}; other processes busy on {others_during:.2f} "
                 f"CPUs on average during the run", flush=True)
        print(f"load: {verdict(cpus, load_before, others_before, others_during)} (load average "
                 f"{load_before:.2f} before, {load_after:.2f} after; other processes used {others_before:.2f} "
                 f"CPUs before, {others_during:.2f} during; {cpus} CPUs)", flush=True)
