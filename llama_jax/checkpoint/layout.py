"""Where things are in our two checkpoint layouts, and the files beside the arrays.

Params-only directory (written by `save_params` and `convert --to orbax`; read by `init_from=`,
evaluation and conversion):
    DIR/model.yaml                  the ModelConfig mapping
    DIR/params/                     the pure-dict params (orbax), stored in chunks one `embed` index thick
    DIR/integrity.json              size and CRC-32 of each file under params/
    DIR/tokenizer.model|.json       optional
Run directory (written by the trainer, `llama_jax.checkpoint.run`):
    RUN/config.yaml                 the run's config; its `model:` key is the ModelConfig mapping
    RUN/checkpoints/<step>/         params, opt_state (orbax) and meta (JSON) of each kept step
    RUN/checkpoint_integrity/<step>.json   size and CRC-32 of each file of that step
    RUN/tokenizer.model|.json
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from llama_jax.model.config import ModelConfig
from llama_jax.model.lora import LoraConfig
from llama_jax.utils.config_io import from_dict, load_yaml, to_dict
from llama_jax.utils.files import tokenizer_files

MODEL_CONFIG_FILE = "model.yaml"
PARAMS_DIR = "params"
PARAMS_RECORD = "integrity.json"
RUN_CONFIG_FILE = "config.yaml"
RUN_CHECKPOINT_DIR = "checkpoints"
RUN_INTEGRITY_DIR = "checkpoint_integrity"


def is_params_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_CONFIG_FILE).is_file() and (Path(path) / PARAMS_DIR).is_dir()


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_CONFIG_FILE).is_file() and (Path(path) / RUN_CHECKPOINT_DIR).is_dir()


def step_record(run_dir: str | os.PathLike, step: int) -> Path:
    """The integrity record of a run's checkpoint step."""
    return Path(run_dir) / RUN_INTEGRITY_DIR / f"{step}.json"


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored with a params directory (`model.yaml`) or a run directory (`config.yaml: model`)."""
    path = Path(path)
    if is_params_dir(path):
        return from_dict(ModelConfig, load_yaml(path / MODEL_CONFIG_FILE))
    if is_run_dir(path):
        run_cfg = load_yaml(path / RUN_CONFIG_FILE)
        if not isinstance(run_cfg.get("model"), dict):
            raise ValueError(f"{path / RUN_CONFIG_FILE}: no `model:` mapping (the run's ModelConfig)")
        return from_dict(ModelConfig, run_cfg["model"], prefix="model.")
    raise FileNotFoundError(f"{path}: neither a params directory ({MODEL_CONFIG_FILE} + {PARAMS_DIR}/) "
                            f"nor a run directory ({RUN_CONFIG_FILE} + {RUN_CHECKPOINT_DIR}/)")


def write_model_config(directory: Path, model_cfg: ModelConfig) -> None:
    (directory / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(model_cfg), sort_keys=False))


def read_lora(path: str | os.PathLike) -> tuple[LoraConfig, Path] | None:
    """(adapter config, base checkpoint) of a LoRA run directory, whose checkpoints hold only adapters;
    None for anything else. The base is the run's `init_from`, as written (relative to the current
    directory, as it was for training)."""
    path = Path(path)
    if not is_run_dir(path):
        return None
    run_cfg = load_yaml(path / RUN_CONFIG_FILE)
    lora = from_dict(LoraConfig, run_cfg.get("lora") or {}, prefix="lora.")
    if not lora.enabled:
        return None
    base = Path(str(run_cfg.get("init_from") or "")).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"{path}: LoRA run whose base checkpoint (init_from) {base} is not a directory here")
    return lora, base


def find_tokenizer(path: str | os.PathLike) -> str | None:
    """The tokenizer file that travels with a checkpoint directory, if any."""
    found = tokenizer_files(path)
    return str(found[0]) if found else None
