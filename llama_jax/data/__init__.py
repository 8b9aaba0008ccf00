"""The data pipeline: sources (built-in corpus, text, JSONL, TFDS) -> tokens -> packed, sharded batches.

`make_train_iterator` gives an infinite, shuffled, resumable iterator over the training mixture;
`make_eval_batches` one finite pass over the validation split. Conversation sources (alpaca, sharegpt,
chat) give fine-tuning batches instead: chat template, loss on the answers only (`sft.py`).
tensorflow_datasets is imported only when a tfds source is configured.
"""
from llama_jax.data.config import DataConfig, SourceConfig
from llama_jax.data.batches import make_eval_batches, make_train_iterator
from llama_jax.data.pipeline import TrainIterator, validation_text

__all__ = ["DataConfig", "SourceConfig", "TrainIterator", "make_eval_batches", "make_train_iterator",
           "validation_text"]
