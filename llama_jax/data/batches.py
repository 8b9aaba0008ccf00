"""The data pipeline's entry points: pretraining batches (`pipeline.py`) or, when the data config's
sources are conversations, fine-tuning batches (`sft.py`); same iterator interface, same batch keys."""
from __future__ import annotations

from llama_jax.data import pipeline, sft
from llama_jax.data.config import DataConfig


def make_train_iterator(cfg: DataConfig, tokenizer, **kwargs) -> pipeline.TrainIterator:
    """`pipeline.make_train_iterator` or `sft.make_sft_train_iterator` (same keyword arguments)."""
    make = sft.make_sft_train_iterator if cfg.is_chat else pipeline.make_train_iterator
    return make(cfg, tokenizer, **kwargs)


def make_eval_batches(cfg: DataConfig, tokenizer, **kwargs):
    """`pipeline.make_eval_batches` or `sft.make_sft_eval_batches` (same keyword arguments; fine-tuning
    batches carry no `num_bytes`: their loss is on answers, not on a text to compress)."""
    make = sft.make_sft_eval_batches if cfg.is_chat else pipeline.make_eval_batches
    return make(cfg, tokenizer, **kwargs)
