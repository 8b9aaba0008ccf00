"""When a process joins a multi-host job, judged from config and environment (no job is started here;
tests/test_multihost.py runs a real two-process one)."""
import pytest

from llama_jax.utils.config_io import ConfigError, from_dict
from llama_jax.parallel.distributed import DistributedConfig, cluster_in_environment, initialize, is_main_process, should_join

LAUNCHER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def bare_env(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_config_validation():
    assert from_dict(DistributedConfig, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                         "process_id": 3}).process_id == 3
    with pytest.raises(ConfigError, match="distributed.mode='maybe'"):
        DistributedConfig(mode="maybe")
    with pytest.raises(ConfigError, match=r"process_id=4 is outside \[0, num_processes=4\)"):
        DistributedConfig(num_processes=4, process_id=4)
    with pytest.raises(ConfigError, match="num_processes must be > 0"):
        DistributedConfig(num_processes=0)
    with pytest.raises(ConfigError, match="mode=off contradicts"):
        DistributedConfig(mode="off", coordinator_address="h:1")


def test_mode_on_and_off_as_written_in_yaml_or_on_the_command_line():
    """A bare on/off is a YAML 1.1 boolean; the documented `distributed.mode=on` must still mean "on"."""
    from llama_jax.training.config import load_train_config

    for written, mode in (("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto")):
        assert load_train_config(None, [f"distributed.mode={written}"]).distributed.mode == mode
    assert from_dict(DistributedConfig, {"mode": False}).mode == "off"
    with pytest.raises(ConfigError, match="distributed.mode='yes please'"):
        load_train_config(None, ["distributed.mode=yes please"])


def test_auto_mode_joins_only_multi_process_launches(bare_env):
    assert cluster_in_environment() is None and not should_join(DistributedConfig())
    bare_env.setenv("SLURM_JOB_ID", "7")
    bare_env.setenv("SLURM_STEP_NODELIST", "node[01-04]")
    bare_env.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is a single process
    assert not should_join(DistributedConfig())
    bare_env.setenv("SLURM_NTASKS", "4")
    assert cluster_in_environment() == "slurm" and should_join(DistributedConfig())
    assert not should_join(DistributedConfig(mode="off"))


def test_explicit_coordinator_or_mode_on_joins(bare_env):
    assert should_join(DistributedConfig(coordinator_address="127.0.0.1:5555", num_processes=2, process_id=0))
    assert should_join(DistributedConfig(mode="on"))
    bare_env.setenv("OMPI_COMM_WORLD_SIZE", "8")
    assert cluster_in_environment() == "openmpi"


def test_auto_mode_joins_a_multi_host_gke_tpu_slice(bare_env):
    bare_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host slice: one process
    assert cluster_in_environment() is None
    bare_env.setenv("TPU_WORKER_HOSTNAMES", "job-0.svc,job-1.svc,job-2.svc,job-3.svc")
    assert cluster_in_environment() == "gke-tpu" and should_join(DistributedConfig())


def test_single_process_stays_alone(bare_env):
    assert initialize(DistributedConfig()) is False
    assert initialize(DistributedConfig(mode="off")) is False
    assert is_main_process()
