"""Per-token log-likelihoods of many token sequences: the forward pass perplexity and tasks share.

Sequences are grouped into batches of similar length (sorted, longest first, so an out-of-memory batch
shows up at once) and right-padded to a length bucket (`length_bucket`: four steps per power of two, so
at most a quarter of a row is padding, capped at the longest allowed). A batch has as many rows as it
has sequences, rounded up to a power of two and capped at the batch size: memory follows the work
submitted (one 3,000-token document is one row of 3,072 positions, not `batch_size` rows of the model's
`max_seq_len`), and a whole evaluation still compiles a handful of programs. Padding has segment id 0:
the model's attention ignores it and its scores are dropped. The result for a sequence of n tokens is
log p(token t | tokens < t) and whether token t is the argmax, for t = 1 .. n-1, from logits computed
`loss_chunk_size` positions at a time (`transformer.target_log_probs`): [tokens, vocab] never exists whole.

The model reads only tokens 0 .. n-2 (the last token is a target, never an input), so a sequence may
hold `max_len + 1` tokens for a `max_len`-token model input: lm-evaluation-harness's convention, under
which a window of a model with a 2048-token context predicts 2048 tokens.

Continuations of a shared context (a multiple-choice item's choices) are scored by
`TokenScorer.score_continuations`: each distinct context runs through the model once, filling a KV
cache, and its continuations read that cache, so a 4-choice item costs one context and four short
continuations instead of four (context + continuation) rows. Continuations are short and of mixed
lengths, so they are packed, PIECES_PER_ROW to a row (`pack_pieces`), rather than each padded to the
longest: a row's cache holds each of its pieces' contexts side by side, context and piece sharing a
segment id, so a piece attends to its own context and itself only.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.evaluation.loading import EvalModel
from llama_jax.model import transformer
from llama_jax.model.transformer import KVCache

MIN_BUCKET = 16
STEPS_PER_OCTAVE = 4  # length buckets between two powers of two: at most 1/4 of a row is padding
PIECES_PER_ROW = 2  # continuations packed into one row (each adds its context's length to the row's keys)


def _sequence_scores(cfg, params, tokens, segment_ids, read=None):
    """tokens [rows, width + 1]: the model reads the first `width`, each predicting the next; `read`
    [rows, n]: the input positions whose predictions are wanted (default all). (log p(target), target is
    the argmax), the logits `cfg.loss_chunk_size` positions at a time, never whole
    (`transformer.log_probs_in_chunks`)."""
    targets = tokens[:, 1:] if read is None else jnp.take_along_axis(tokens, read + 1, axis=1)
    return transformer.target_log_probs(cfg, params, tokens[:, :-1], targets, segment_ids=segment_ids[:, :-1],
                                        logits_at=read)


def _continuation_scores(cfg, params, prefix, prefix_segments, owner, slot_segments, inputs, targets, positions,
                         segment_ids):
    """prefix [P, Wp]: each context but its last token, left-padded (segment id 0). The continuation rows
    [C, W] (inputs, targets, positions, segment_ids) pack up to S pieces each: piece j of a row reads its
    context's last token then its continuation but the last token, predicting the continuation, at the
    positions following its context's, with segment id j + 1 (padding 0). owner [C, S]: the prefix row of
    each piece; slot_segments [C, S]: j + 1 for a used slot j, else 0. The prefixes fill a KV cache once;
    a continuation row's cache holds its pieces' prefixes side by side, slot j's with segment id j + 1,
    so each piece attends to its own context's cached keys and values, then to itself."""
    n_prefix, prefix_width = prefix.shape
    rows, slots = owner.shape
    width = inputs.shape[1]
    cache = KVCache.create(cfg, n_prefix, prefix_width)
    prefix_positions = jnp.maximum(jnp.cumsum(prefix_segments, axis=1) - 1, 0)
    no_logits = jnp.zeros((n_prefix, 1), jnp.int32)  # the prefix pass needs only its cache
    _, cache = transformer.apply(cfg, params, prefix, positions=prefix_positions, segment_ids=prefix_segments,
                                 cache=cache, logits_at=no_logits)

    def side_by_side(c):  # [layers, P, heads, Wp, d] -> [layers, C, heads, S * Wp + W, d]
        layers, _, heads, _, head_dim = c.shape
        c = c[:, owner].transpose(0, 1, 3, 2, 4, 5).reshape(layers, rows, heads, slots * prefix_width, head_dim)
        return jnp.pad(c, ((0, 0), (0, 0), (0, 0), (0, width), (0, 0)))

    cached_segments = (prefix_segments[owner] * slot_segments[:, :, None]).reshape(rows, slots * prefix_width)
    cache = KVCache(side_by_side(cache.k), side_by_side(cache.v), jnp.pad(cached_segments, ((0, 0), (0, width))),
                    jnp.int32(slots * prefix_width))
    return transformer.target_log_probs(cfg, params, inputs, targets, positions=positions, segment_ids=segment_ids,
                                        cache=cache)


def pack_pieces(lengths: Sequence[int], width: int, slots: int) -> list[list[int]]:
    """Piece indices per row: first fit, longest first, at most `width` tokens and `slots` pieces a row."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r in range(len(rows)) if used[r] + lengths[i] <= width and len(rows[r]) < slots), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        used[row] += lengths[i]
    return rows


def length_bucket(length: int, max_len: int) -> int:
    """Smallest bucket holding `length`, capped at `max_len`: MIN_BUCKET, then STEPS_PER_OCTAVE evenly
    spaced sizes per power of two (16, 20, 24, 28, 32, 40, 48, ...)."""
    if length > max_len:
        raise ValueError(f"a sequence of {length + 1} tokens ({length} model inputs) exceeds the maximum "
                         f"length {max_len}")
    octave = MIN_BUCKET
    while octave * 2 < length:
        octave *= 2
    step = max(octave // STEPS_PER_OCTAVE, 1)
    return min(max(MIN_BUCKET, -(-length // step) * step), max_len)


def row_count(n: int, batch_rows: int, multiple: int = 1) -> int:
    """Rows of a batch of `n` sequences: n rounded up to a power of two, at most `batch_rows`, a
    multiple of `multiple` (the devices rows are split over)."""
    rows = 1
    while rows < n:
        rows *= 2
    rows = min(rows, batch_rows)
    return -(-rows // multiple) * multiple


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
    """Scores token sequences with `model` in batches of at most `batch_size` rows (rounded up to the
    mesh's row multiple); a sequence holds at most `max_len + 1` tokens (`max_len` model inputs)."""

    def __init__(self, model: EvalModel, *, batch_size: int, max_len: int | None = None):
        self.model = model
        self.rows = -(-batch_size // model.row_multiple) * model.row_multiple
        self.max_len = max_len or model.cfg.max_seq_len
        if not 2 <= self.max_len <= model.cfg.max_seq_len:
            raise ValueError(f"maximum sequence length {self.max_len} must be in [2, the model's max_seq_len "
                             f"{model.cfg.max_seq_len}]")
        out = model.out_sharding()
        self._sequences = jax.jit(functools.partial(_sequence_scores, model.cfg), out_shardings=out)
        self._continuations = jax.jit(functools.partial(_continuation_scores, model.cfg), out_shardings=out)

    def _run(self, fn, *arrays):
        """`fn` on the rows of host `arrays` (None stays None), results as numpy."""
        with self.model.activate():
            logp, greedy = fn(self.model.params, *(None if a is None else self.model.place_rows(a) for a in arrays))
        return np.asarray(logp, np.float64), np.asarray(greedy)

    def score(self, sequences: Sequence[Sequence[int]], groups: Sequence[Sequence[int]] | None = None,
              tails: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(log-probabilities float64 [n-1], is-argmax bool [n-1]) for each sequence of n >= 2 tokens;
        with `tails`, only the last tails[i] of each (a continuation's): the model's output layer then
        runs on those positions alone (a bucket's count per batch, at least MIN_BUCKET)."""
        seqs = [np.asarray(s, np.int32) for s in sequences]
        for i, s in enumerate(seqs):
            if len(s) < 2:
                raise ValueError(f"sequence {i} has {len(s)} token(s); scoring needs at least 2")
        results: list = [None] * len(seqs)
        for batch in plan_batches([len(s) for s in seqs], self.rows, groups):
            rows = row_count(len(batch), self.rows, self.model.row_multiple)
            width = length_bucket(max(len(seqs[i]) for i in batch) - 1, self.max_len) + 1
            tokens = np.zeros((rows, width), np.int32)
            segments = np.zeros((rows, width), np.int32)
            for row, i in enumerate(batch):
                tokens[row, :len(seqs[i])] = seqs[i]
                segments[row, :len(seqs[i])] = 1
            read = None
            if tails is not None:
                n = min(length_bucket(max(tails[i] for i in batch), self.max_len), width - 1)
                ends = np.zeros(rows, np.int32)
                ends[:len(batch)] = [len(seqs[i]) - 1 for i in batch]
                read = np.maximum(ends[:, None] - n + np.arange(n, dtype=np.int32), 0)  # the last n inputs
            logp, greedy = self._run(self._sequences, tokens, segments, read)
            for row, i in enumerate(batch):
                keep = slice(None, len(seqs[i]) - 1) if tails is None else slice(-tails[i], None)
                results[i] = (logp[row, keep], greedy[row, keep])
        return results

    def score_continuations(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                            ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(log p, is-argmax) of each continuation's tokens given its context, for (context >= 1 token,
        continuation >= 1 token) pairs. Pairs with the same context share one pass over it (module
        docstring); a pair longer than `max_len + 1` tokens is cut on the left, as lm-eval cuts it, and
        scored as one sequence."""
        results: list = [None] * len(pairs)
        by_context: dict[tuple, list[int]] = defaultdict(list)
        too_long = []
        for i, (ctx, cont) in enumerate(pairs):
            if not len(ctx) or not len(cont):
                raise ValueError(f"pair {i}: context and continuation need a token each, got {len(ctx)} and "
                                 f"{len(cont)}")
            if len(ctx) + len(cont) > self.max_len + 1:
                too_long.append(i)
            else:
                by_context[tuple(int(t) for t in ctx)].append(i)
        if too_long:
            cut = [(list(pairs[i][0]) + list(pairs[i][1]))[-(self.max_len + 1):] for i in too_long]
            tails = [min(len(pairs[i][1]), len(s) - 1) for i, s in zip(too_long, cut)]
            for i, scored in zip(too_long, self.score(cut, tails=tails)):
                results[i] = scored
        for contexts, members, packed in self._plan_shared(by_context, pairs):
            self._score_shared(contexts, members, packed, pairs, results)
        return results

    def _continuation_width(self, lengths: Sequence[int]) -> int:
        """Continuation rows' width: a power of two (16, 32, ...) holding the longest piece; few widths
        keep the number of compiled programs (one per prefix bucket and width) small."""
        return min(max(MIN_BUCKET, 1 << (max(lengths) - 1).bit_length()), self.max_len)

    def _packed_rows(self, members: list[list[int]], pairs) -> list[list[int]]:
        """The pair indices of each continuation row of a batch (`pack_pieces`)."""
        flat = [i for m in members for i in m]
        lengths = [len(pairs[i][1]) for i in flat]
        rows = pack_pieces(lengths, self._continuation_width(lengths), PIECES_PER_ROW)
        return [[flat[j] for j in row] for row in rows]

    def _plan_shared(self, by_context: dict, pairs) -> list[tuple[list[tuple], list[list[int]], list[list[int]]]]:
        """Batches of (contexts, each one's pair indices, the packed continuation rows): longest context
        first, at most `rows` contexts and `rows` packed continuation rows per batch; a context's
        continuations stay in one batch unless they alone do not fit in one."""
        order = sorted(by_context, key=lambda c: (-len(c), c))
        batches, contexts, members, packed = [], [], [], []
        for ctx in order:
            pending = by_context[ctx]
            while pending:
                take = pending[:self.rows * PIECES_PER_ROW]
                rows = None if len(contexts) == self.rows else self._packed_rows(members + [take], pairs)
                if contexts and (rows is None or len(rows) > self.rows):
                    batches.append((contexts, members, packed))
                    contexts, members, packed = [], [], []
                    continue
                while len(rows) > self.rows:  # a first context whose continuations alone overflow a batch
                    take = take[:-1]
                    rows = self._packed_rows([take], pairs)
                pending = pending[len(take):]
                contexts.append(ctx)
                members.append(take)
                packed = rows
        if contexts:
            batches.append((contexts, members, packed))
        return batches

    def _score_shared(self, contexts: list[tuple], members: list[list[int]], packed: list[list[int]], pairs,
                      results: list) -> None:
        owner_of = {i: p for p, member in enumerate(members) for i in member}
        prefix_rows = row_count(len(contexts), self.rows, self.model.row_multiple)
        cont_rows = row_count(len(packed), self.rows, self.model.row_multiple)
        prefix_width = length_bucket(max(len(c) - 1 for c in contexts), self.max_len)
        width = self._continuation_width([len(pairs[i][1]) for i in owner_of])
        prefix = np.zeros((prefix_rows, prefix_width), np.int32)
        prefix_segments = np.zeros_like(prefix)
        for p, ctx in enumerate(contexts):
            if len(ctx) > 1:
                prefix[p, prefix_width - len(ctx) + 1:] = ctx[:-1]
                prefix_segments[p, prefix_width - len(ctx) + 1:] = 1
        owner = np.zeros((cont_rows, PIECES_PER_ROW), np.int32)
        slot_segments = np.zeros_like(owner)
        inputs, targets, positions, segments = (np.zeros((cont_rows, width), np.int32) for _ in range(4))
        where = {}  # pair index -> (row, first column, length)
        for row, pieces in enumerate(packed):
            col = 0
            for slot, i in enumerate(pieces):
                ctx, cont = contexts[owner_of[i]], pairs[i][1]
                n = len(cont)
                owner[row, slot], slot_segments[row, slot] = owner_of[i], slot + 1
                inputs[row, col] = ctx[-1]
                inputs[row, col + 1:col + n] = cont[:-1]
                targets[row, col:col + n] = cont
                positions[row, col:col + n] = len(ctx) - 1 + np.arange(n)
                segments[row, col:col + n] = slot + 1
                where[i] = (row, col, n)
                col += n
        logp, greedy = self._run(self._continuations, prefix, prefix_segments, owner, slot_segments, inputs,
                                 targets, positions, segments)
        for i, (row, col, n) in where.items():
            results[i] = (logp[row, col:col + n], greedy[row, col:col + n])
