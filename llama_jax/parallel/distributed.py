"""Join a multi-host job: every host runs the same program, JAX's coordinator connects them.

Call `initialize(cfg.distributed)` first thing, before any other JAX call. Then `jax.devices()` lists
the devices of all hosts, the mesh spans them (`llama_jax.parallel.mesh.make_mesh`), each host feeds its own
rows (`make_global_batch`), only `is_main_process()` logs, and all hosts take part in checkpointing.

Modes:
    auto  join when the environment says this is one process of several: an explicit coordinator
          (config or JAX_COORDINATOR_ADDRESS), a SLURM step with more than one task, an Open MPI job
          with more than one rank, a multi-host TPU slice on GKE (TPU_WORKER_HOSTNAMES lists more
          than one host); otherwise run alone. (A TPU VM slice started with `gcloud ... ssh
          --worker=all` says so only through the metadata server, which `auto` does not query: use
          `on` there.)
    on    always join; whatever is not given explicitly is detected by JAX (Cloud TPU, SLURM, Open MPI,
          Kubernetes).
    off   never join: a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import jax

from llama_jax.utils.config_io import ConfigError

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class DistributedConfig:
    # YAML 1.1 reads a bare on/off (`distributed.mode=on`, `mode: off`) as a boolean: taken as "on"/"off".
    mode: str | bool = field(default="auto", metadata={
        "choices": MODES, "help": "join a multi-host job (auto: when the environment says so)"})
    coordinator_address: str | None = field(default=None, metadata={
        "help": "host:port of process 0's coordinator service"})
    num_processes: int | None = field(default=None, metadata={"help": "processes in the job (default: detected)"})
    process_id: int | None = field(default=None, metadata={"help": "this process's index (default: detected)"})
    initialization_timeout_s: int = field(default=300, metadata={"help": "seconds to wait for every process"})

    def __post_init__(self):
        if isinstance(self.mode, bool):
            object.__setattr__(self, "mode", "on" if self.mode else "off")
        if self.mode not in MODES:
            raise ConfigError(f"distributed.mode={self.mode!r}; expected one of {list(MODES)}")
        if self.num_processes is not None and self.num_processes <= 0:
            raise ConfigError(f"distributed.num_processes must be > 0, got {self.num_processes}")
        if self.process_id is not None and (self.process_id < 0 or self.process_id >= (self.num_processes or 1 << 30)):
            raise ConfigError(f"distributed.process_id={self.process_id} is outside "
                              f"[0, num_processes={self.num_processes})")
        if self.initialization_timeout_s <= 0:
            raise ConfigError("distributed.initialization_timeout_s must be > 0")
        if self.mode == "off" and self.coordinator_address:
            raise ConfigError("distributed.mode=off contradicts distributed.coordinator_address")


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def cluster_in_environment() -> str | None:
    """The multi-process launcher this process runs under, judged from its environment, or None."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in os.environ and "SLURM_STEP_NODELIST" in os.environ and _env_int("SLURM_NTASKS") > 1:
        return "slurm"
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "gke-tpu"
    return None


def should_join(cfg: DistributedConfig) -> bool:
    if cfg.mode == "off":
        return False
    return cfg.mode == "on" or bool(cfg.coordinator_address) or cluster_in_environment() is not None


def initialize(cfg: DistributedConfig) -> bool:
    """Join the job described by `cfg` (see the module docstring); True if this is a multi-process run.

    Idempotent: a second call after a successful join does nothing.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if not should_join(cfg):
        return False
    try:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, initialization_timeout=cfg.initialization_timeout_s)
    except ValueError as err:  # nothing detected and not enough given explicitly
        raise ConfigError(f"distributed: could not join a multi-host job ({err}); set "
                          f"distributed.coordinator_address, distributed.num_processes and "
                          f"distributed.process_id, or use distributed.mode=off for one process") from err
    return jax.process_count() > 1


def is_main_process() -> bool:
    """True on the process that logs and writes single-writer files (process 0)."""
    return jax.process_index() == 0
