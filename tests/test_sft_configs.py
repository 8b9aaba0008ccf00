"""The shipped 7B/8B fine-tuning configs: valid as written (init_from a Meta or Hugging Face directory, no
conversion step), with LoRA too, and `plan` agrees with their comments (fit on 8 devices of 80 GiB).

Oracle: the configs' own claims, checked by the config loader and the memory planner.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from llama_jax.training.config import load_train_config
from llama_jax.training.plan import plan_cli

TRAIN_CONFIGS = Path(__file__).parents[1] / "llama_jax" / "configs" / "train"


@pytest.mark.parametrize("name,init_from", [("sft-llama2-7b", "checkpoints/llama-2-7b"),
                                            ("sft-llama3.1-8b", "checkpoints/Meta-Llama-3.1-8B")])
def test_shipped_sft_configs_start_from_meta_or_hf_directories_and_fit(name, init_from, capsys):
    path = TRAIN_CONFIGS / f"{name}.yaml"
    text = path.read_text()
    assert "convert" not in text.split("model:")[0]  # the header no longer asks for a conversion step
    cfg = load_train_config(path)
    assert cfg.init_from == init_from and cfg.data.is_chat
    assert load_train_config(path, ["lora.rank=16", "lora.dropout=0.05"]).lora.enabled
    for extra in ([], ["lora.rank=16", "lora.base_dtype=bfloat16"]):
        assert plan_cli([str(path), "devices=8", "device_memory_gib=80", *extra]) == 0
        assert "device memory 80 GiB: fits" in capsys.readouterr().out
