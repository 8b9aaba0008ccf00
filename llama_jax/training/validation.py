"""Validation during and after training: loss and bits per byte on the held-out split, and gzip's baseline.

`Evaluator` scores a fixed list of validation batches (`eval_batches` of them every `eval_every` steps,
all of them in the final pass); `final_validation` adds what `gzip -9` achieves on the same text, the
figure a language model must beat.
"""
from __future__ import annotations

import gzip
import math

import jax

from llama_jax.data.tokenizer import Tokenizer
from llama_jax.parallel.mesh import make_global_batch
from llama_jax.training.config import TrainConfig


class Evaluator:
    """Validation loss and bits per byte over a fixed list of batches (built once, reused every eval).

    Every process builds the whole global batches (validation is small) so it can count the bytes of all
    rows, and feeds only its own rows to the devices.
    """

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, eval_fn, mesh, rules, max_batches: int | None):
        from llama_jax.data import make_eval_batches

        batch_size = cfg.eval_batch_size or cfg.global_batch_size
        self._batches = list(make_eval_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=batch_size,
                                               max_batches=max_batches))
        self._rows = slice(jax.process_index() * batch_size // jax.process_count(),
                           (jax.process_index() + 1) * batch_size // jax.process_count())
        self._step, self._mesh, self._rules = eval_fn, mesh, rules

    def __call__(self, params) -> dict:
        nll = tokens = 0.0
        num_bytes = 0
        text = "num_bytes" in self._batches[0]  # else fine-tuning: the loss on held-out answers only
        for batch in self._batches:
            num_bytes += int(batch["num_bytes"].sum()) if text else 0
            local = {k: v[self._rows] for k, v in batch.items() if k != "num_bytes"}
            sums = jax.device_get(self._step(params, make_global_batch(local, self._mesh, self._rules)))
            nll += float(sums["nll_sum"])
            tokens += float(sums["tokens"])
        if not text:
            return {"loss": nll / max(tokens, 1.0), "tokens": int(tokens)}
        return {"loss": nll / max(tokens, 1.0), "bits_per_byte": nll / math.log(2) / max(num_bytes, 1),
                "tokens": int(tokens), "bytes": num_bytes}


def gzip_bits_per_byte(text: bytes) -> float:
    """What `gzip -9` achieves on `text`: the baseline a language model must beat."""
    return 8.0 * len(gzip.compress(text, compresslevel=9)) / max(len(text), 1)


def final_validation(cfg: TrainConfig, evaluator: Evaluator, params) -> dict:
    """A full pass over the validation split, next to gzip -9 on the same text."""
    from llama_jax.data import validation_text

    values = evaluator(params)
    if cfg.data.is_chat:  # held-out conversations: no text to compress
        return values
    values["gzip9_bits_per_byte"] = gzip_bits_per_byte(validation_text(cfg.data))
    return values
