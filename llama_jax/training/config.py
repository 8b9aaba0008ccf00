"""The training run's configuration: one dataclass holding every section, validated once at load.

`python train.py [CONFIG.yaml] key=value ...` reads a YAML file (default `configs/train/default.yaml`),
applies the overrides and builds `TrainConfig` with the project's one loader (`llama_jax.utils.config_io`),
so a typo or a contradiction fails before anything is compiled.

The `model` section is a preset name (`model: tiny`), a mapping with an optional `preset` key plus field
overrides (`model: {preset: llama1-7b, n_layers: 2}`), or a full ModelConfig mapping (what a run
directory's resolved `config.yaml` holds). On the command line `model=llama1-65b` picks another preset
and `model.n_layers=2` changes one field of whichever preset is chosen.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from llama_jax.model.config import CONFIG_DIR, ModelConfig, model_config_dict
from llama_jax.model.lora import LoraConfig
from llama_jax.utils.config_io import ConfigError, apply_overrides, from_dict, load_yaml, parse_override
from llama_jax.data import DataConfig
from llama_jax.parallel.mesh import MeshConfig
from llama_jax.parallel.distributed import DistributedConfig
from llama_jax.training.step import OptimizerConfig
from llama_jax.training.spikes import SpikeConfig

DEFAULT_TRAIN_CONFIG = CONFIG_DIR / "train" / "default.yaml"
PROGRESS_MODES = ("auto", "bar", "lines")


@dataclass(frozen=True)
class TaskEvalConfig:
    """Tasks scored during training (`eval_tasks`): the paper's accuracy-over-training figure.

    Empty `tasks` (the default): nothing is loaded, built or run. The tasks are read and every prompt is
    built when the run starts, so an unknown name or a bad task file fails before the train step compiles.
    """

    tasks: list[str] = field(default_factory=list)  # catalog names and/or .jsonl/.yaml task files
    limit: int | None = None  # the first N items of each task; null: all
    num_fewshot: int | None = None  # null: each task's own default
    batch_size: int = 16
    data_dir: str | None = None  # TFDS data_dir of catalog tasks
    # consent to running code tasks' generated programs with the audit hook and limits alone where
    # bubblewrap cannot run (evaluation's --unsafe-run-generated-code); otherwise such a run is refused
    unsafe_run_generated_code: bool = False

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval_tasks.limit must be >= 1 (or null: all items), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"eval_tasks.num_fewshot must be >= 0 (or null), got {self.num_fewshot}")
        if self.batch_size < 1:
            raise ConfigError(f"eval_tasks.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the resolved copy is written to `run_dir/config.yaml`.

    Step counts are optimizer updates; `global_batch_size` rows of `seq_len` tokens per update, split
    into `micro_batches` sequential chunks (gradient accumulation) to bound activation memory.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    spikes: SpikeConfig = field(default_factory=SpikeConfig)  # loss-spike rollback; off by default
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: train adapters on the init_from base
    run_dir: str = "runs/default"
    steps: int = 1000
    stop_at_step: int = 0  # end this invocation (with a checkpoint) after this step; 0 = at `steps`
    global_batch_size: int = 8
    seq_len: int = 256
    micro_batches: int = 1
    seed: int = 0
    # Tokenizer: a .model/.json file or directory; "" = the built-in corpus's own SentencePiece model
    # with the model's vocab_size, trained once and cached under `cache_dir`.
    tokenizer: str = ""
    cache_dir: str = "~/.cache/llama_jax"
    init_from: str = ""  # Meta, HF, params-only or run directory to start from, with a fresh optimizer
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 0  # batches per periodic evaluation; 0 = the whole validation split
    eval_batch_size: int = 0  # 0 = global_batch_size
    final_eval: bool = True  # a full pass over the validation split at the end, compared with gzip -9
    eval_tasks: TaskEvalConfig = field(default_factory=TaskEvalConfig)
    task_eval_every: int = 0  # score eval_tasks every N steps (and at the last step); 0 = at the last step only
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    keep_period: int = 0  # also keep every step divisible by this forever (milestones); 0 = none
    async_checkpointing: bool = True
    progress: str = "auto"  # auto: a tqdm bar on a terminal, plain log lines otherwise
    peak_flops_per_device: float = 0.0  # MFU denominator; 0 = the table in llama_jax.training.metrics
    profile_steps: int = 0  # trace this many steps with JAX's profiler into run_dir/profile; 0 = off
    profile_start_step: int = 3  # the first traced step (step 1 compiles)
    lock_heartbeat_s: float = 30.0  # how often process 0 refreshes run_dir/lock.json
    lock_stale_after_s: float = 600.0  # a lock whose heartbeat is older is a crashed job's: taken over

    def __post_init__(self):
        positive = ("steps", "global_batch_size", "seq_len", "micro_batches", "log_every", "checkpoint_every",
                    "keep_checkpoints", "profile_start_step")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("stop_at_step", "eval_every", "eval_batches", "eval_batch_size", "keep_period", "profile_steps",
                    "task_eval_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.profile_steps and self.profile_start_step > self.steps:
            raise ConfigError(f"profile_start_step={self.profile_start_step} is beyond steps={self.steps}: "
                              f"nothing would be traced")
        if self.stop_at_step > self.steps:
            raise ConfigError(f"stop_at_step={self.stop_at_step} is beyond steps={self.steps}")
        if self.global_batch_size % self.micro_batches:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not divisible by "
                              f"micro_batches={self.micro_batches}")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.progress not in PROGRESS_MODES:
            raise ConfigError(f"progress={self.progress!r}; expected one of {list(PROGRESS_MODES)}")
        if not (math.isfinite(self.peak_flops_per_device) and self.peak_flops_per_device >= 0):
            raise ConfigError(f"peak_flops_per_device must be >= 0, got {self.peak_flops_per_device}")
        if self.task_eval_every and not self.eval_tasks.tasks:
            raise ConfigError(f"task_eval_every={self.task_eval_every} but eval_tasks.tasks names no task")
        if not self.run_dir:
            raise ConfigError("run_dir must name a directory")
        if self.spikes.enabled and self.keep_checkpoints * self.checkpoint_every <= self.spikes.patience:
            raise ConfigError(f"spikes.patience={self.spikes.patience} needs a checkpoint from before a spike to "
                              f"roll back to: keep_checkpoints × checkpoint_every "
                              f"({self.keep_checkpoints} × {self.checkpoint_every}) must exceed it")
        if self.lora.enabled and not self.init_from:
            raise ConfigError("lora.rank > 0 needs init_from: the base weights the adapters modify")
        if not 0 < self.lock_heartbeat_s < self.lock_stale_after_s:
            raise ConfigError(f"lock_heartbeat_s={self.lock_heartbeat_s} must be > 0 and below "
                              f"lock_stale_after_s={self.lock_stale_after_s}")

    @property
    def last_step(self) -> int:
        """The step this invocation ends at."""
        return self.stop_at_step or self.steps

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir))


def resolve_model_section(section) -> dict:
    """The `model` section as a full ModelConfig mapping: preset file values, then the given fields."""
    if isinstance(section, str):
        section = {"preset": section}
    if not isinstance(section, dict):
        raise ConfigError(f"model: expected a preset name or a mapping, got {section!r}")
    fields = dict(section)
    preset = fields.pop("preset", None)
    if preset is None:
        return fields
    if not isinstance(preset, str):
        raise ConfigError(f"model.preset: expected a preset name, got {preset!r}")
    return {**model_config_dict(preset), **fields}


def _apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Overrides in order; `model=NAME` replaces the whole model section by that preset."""
    for text in overrides:
        path, value = parse_override(text)
        if path == ["model"]:
            data = {**data, "model": {"preset": value} if isinstance(value, str) else value}
            continue
        if path[0] == "model" and isinstance(data.get("model"), str):
            data = {**data, "model": {"preset": data["model"]}}
        data = apply_overrides(data, [text])
    return data


def load_train_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a training YAML (default: configs/train/default.yaml), apply `key=value` overrides, validate."""
    data = _apply_overrides(load_yaml(path or DEFAULT_TRAIN_CONFIG), list(overrides))
    if "model" in data:
        data["model"] = resolve_model_section(data["model"])
    return from_dict(TrainConfig, data)
