"""Per-token log-likelihoods of many token sequences: the forward pass perplexity and tasks share.

Sequences are grouped into batches of similar length (sorted, longest first, so an out-of-memory batch
shows up at once), right-padded to a length bucket (powers of two, capped at the longest allowed) and
to a fixed row count, so a whole evaluation compiles a handful of programs. Padding has segment id 0:
the model's attention ignores it and its scores are dropped. The result for a sequence of n tokens is
log p(token t | tokens < t) and whether token t is the argmax, for t = 1 .. n-1.

The model reads only tokens 0 .. n-2 (the last token is a target, never an input), so a sequence may
hold `max_len + 1` tokens for a `max_len`-token model input: lm-evaluation-harness's convention, under
which a window of a model with a 2048-token context predicts 2048 tokens.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.evaluation.loading import EvalModel
from llama_jax.model import api
from llama_jax.model.loss import token_nll

MIN_BUCKET = 16


def _token_scores(cfg, params, tokens, segment_ids):
    """tokens [rows, width + 1]: the model reads the first `width`, each predicting the next."""
    logits, _ = api.apply(cfg, params, tokens[:, :-1], segment_ids=segment_ids[:, :-1])
    targets = tokens[:, 1:]
    return -token_nll(logits, targets), jnp.argmax(logits, axis=-1) == targets


def length_bucket(length: int, max_len: int) -> int:
    """Smallest power of two (at least MIN_BUCKET) holding `length`, capped at `max_len`."""
    if length > max_len:
        raise ValueError(f"a sequence of {length + 1} tokens ({length} model inputs) exceeds the maximum "
                         f"length {max_len}")
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_len)


def plan_batches(lengths: Sequence[int], batch_size: int, groups: Sequence[Sequence[int]] | None = None
                 ) -> list[list[int]]:
    """Sequence indices per batch: groups (default: one per sequence) sorted longest first, a group
    kept in one batch whenever it fits, batches of at most `batch_size` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups = [[i] for i in range(len(lengths))] if groups is None else [list(g) for g in groups]
    groups.sort(key=lambda g: -max(lengths[i] for i in g))
    batches: list[list[int]] = []
    current: list[int] = []
    for group in groups:
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        for i in group:
            if len(current) == batch_size:
                batches.append(current)
                current = []
            current.append(i)
    if current:
        batches.append(current)
    return batches


class TokenScorer:
    """Scores token sequences with `model` in batches of `batch_size` rows (rounded up to the mesh's
    row multiple); a sequence holds at most `max_len + 1` tokens (`max_len` model inputs)."""

    def __init__(self, model: EvalModel, *, batch_size: int, max_len: int | None = None):
        self.model = model
        self.rows = -(-batch_size // model.row_multiple) * model.row_multiple
        self.max_len = max_len or model.cfg.max_seq_len
        if not 2 <= self.max_len <= model.cfg.max_seq_len:
            raise ValueError(f"maximum sequence length {self.max_len} must be in [2, the model's max_seq_len "
                             f"{model.cfg.max_seq_len}]")
        self._fn = jax.jit(functools.partial(_token_scores, model.cfg), out_shardings=model.out_sharding())

    def score(self, sequences: Sequence[Sequence[int]], groups: Sequence[Sequence[int]] | None = None
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(log-probabilities float64 [n-1], is-argmax bool [n-1]) for each sequence of n >= 2 tokens."""
        seqs = [np.asarray(s, np.int32) for s in sequences]
        for i, s in enumerate(seqs):
            if len(s) < 2:
                raise ValueError(f"sequence {i} has {len(s)} token(s); scoring needs at least 2")
        results: list = [None] * len(seqs)
        for batch in plan_batches([len(s) for s in seqs], self.rows, groups):
            width = length_bucket(max(len(seqs[i]) for i in batch) - 1, self.max_len) + 1
            tokens = np.zeros((self.rows, width), np.int32)
            segments = np.zeros((self.rows, width), np.int32)
            for row, i in enumerate(batch):
                tokens[row, :len(seqs[i])] = seqs[i]
                segments[row, :len(seqs[i])] = 1
            with self.model.activate():
                logp, greedy = self._fn(self.model.params, self.model.place_rows(tokens),
                                        self.model.place_rows(segments))
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for row, i in enumerate(batch):
                results[i] = (logp[row, :len(seqs[i]) - 1], greedy[row, :len(seqs[i]) - 1])
        return results
