"""Fine-tuning batches: conversations -> (token ids, target mask) -> packed rows with segment ids.

Each conversation is rendered by the data config's chat template (`chat_template.py`) into token ids and
a mask of the tokens the model should learn to say (assistant turns and their end-of-turn token). In a row,
target t is token t + 1 and counts in the loss only where that token is in the mask; everything else
(system prompts, user turns, headers, padding) is context only.

Length. A conversation longer than seq_len + 1 tokens is cut at the end, so every target that remains
keeps all of the prompt before it; one whose first target would be cut off is skipped and counted (a
warning gives the count per source; a source left with nothing is an error).

Packing. Whole conversations are packed greedily, in a fixed order, into rows of seq_len positions; each
is a segment (its own positions from 0; attention never crosses segments), so a packed row computes
exactly what its conversations would one by one. Training packs each source once, in an order drawn from
(seed, source), and draws a fresh row order every epoch from (seed, source, epoch): the iterator is the
pretraining one (`TrainIterator`: mixture, per-host rows, resumable state) over these rows. Validation
packs the validation conversations in file order, one pass.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from llama_jax.data.chat_records import RecordError, read_conversations
from llama_jax.data.chat_template import ChatTemplate, TemplateError
from llama_jax.data.config import DataConfig, SourceConfig
from llama_jax.data.packing import padding_row
from llama_jax.data.pipeline import (_DOC_ORDER_STREAM, _ROW_ORDER_STREAM, TrainIterator, _check_seq_len,
                                     _rows_for_host, _stack, _validation_sources)
from llama_jax.data.sources import resolve_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatExamples:
    """Encoded conversations: example k is ids[offsets[k]:offsets[k+1]], `mask` marks its target tokens."""

    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1


def read_source(src: SourceConfig) -> Iterator[tuple[str, list[dict]]]:
    """("where", messages) of every conversation of `src`: its JSONL files in order, or its TFDS split."""
    if src.name:
        from llama_jax.data.tfds_source import read_tfds_conversations

        yield from read_tfds_conversations(src)
        return
    for path in resolve_paths(src.path, key=f"source path ({src.describe()})"):
        yield from read_conversations(src.kind, path, skip_bad_lines=src.skip_bad_lines, fields=src.fields)


def encode_source(src: SourceConfig, template: ChatTemplate, seq_len: int) -> ChatExamples:
    """Every conversation of `src`, rendered, tokenized and cut to seq_len + 1 tokens (see module doc)."""
    ids, masks, lengths, too_long = [], [], [], 0
    for where, messages in read_source(src):
        try:
            example, mask = template.encode(messages)
        except TemplateError as e:
            if src.skip_bad_lines:
                log.warning("skipped %s: %s", where, e)
                continue
            raise RecordError(f"{where}: {e}") from None  # e names the template
        example, mask = example[:seq_len + 1], mask[:seq_len + 1]
        if not mask[1:].any():
            too_long += 1
            continue
        ids.append(example)
        masks.append(mask)
        lengths.append(len(example))
    if too_long:
        log.warning("%s: skipped %d conversation(s) whose first answer starts after seq_len=%d tokens",
                    src.describe(), too_long, seq_len)
    if not ids:
        raise ValueError(f"source {src.describe()}: no conversation with an answer within seq_len={seq_len} tokens"
                         f" ({too_long} too long)")
    return ChatExamples(np.concatenate(ids), np.concatenate(masks), np.concatenate([[0], np.cumsum(lengths)]))


def concat_examples(parts: list[ChatExamples]) -> ChatExamples:
    offsets = [parts[0].offsets] + [p.offsets[1:] for p in parts[1:]]
    for i in range(1, len(offsets)):
        offsets[i] = offsets[i] + offsets[i - 1][-1]
    return ChatExamples(np.concatenate([p.ids for p in parts]), np.concatenate([p.mask for p in parts]),
                        np.concatenate(offsets))


class PackedRows:
    """`examples` in `order`, packed greedily into rows of `seq_len` positions (an example of n tokens
    fills n - 1: its inputs are tokens [0, n-1), its targets tokens [1, n))."""

    def __init__(self, examples: ChatExamples, order: np.ndarray, seq_len: int, *, pad_id: int):
        self.examples, self.order, self.seq_len, self.pad_id = examples, order, seq_len, pad_id
        positions = np.diff(examples.offsets)[order] - 1
        starts, used = [0], 0
        for i, n in enumerate(positions):
            if used + n > seq_len:
                starts.append(i)
                used = 0
            used += n
        starts.append(len(order))
        self.row_starts = np.asarray(starts, np.int64)
        self.num_rows = len(starts) - 1

    def row(self, r: int) -> dict[str, np.ndarray]:
        """Row r as [seq_len] arrays: inputs, targets, segment_ids, positions, loss_mask."""
        out = padding_row(self.seq_len, self.pad_id, with_bytes=False)
        at = 0
        for segment, k in enumerate(self.order[self.row_starts[r]:self.row_starts[r + 1]], start=1):
            lo, hi = self.examples.offsets[k], self.examples.offsets[k + 1]
            tokens, n = self.examples.ids[lo:hi], hi - lo - 1
            out["inputs"][at:at + n] = tokens[:-1]
            out["targets"][at:at + n] = tokens[1:]
            out["segment_ids"][at:at + n] = segment
            out["positions"][at:at + n] = np.arange(n)
            out["loss_mask"][at:at + n] = self.examples.mask[lo + 1:hi]
            at += n
        return out


class SFTTrainIterator(TrainIterator):
    """`TrainIterator` over packed conversations: same mixture, host slicing and resumable state."""

    def __init__(self, sources: list[ChatExamples], weights: list[float], tokenizer, **kwargs):
        self._packings: dict[int, PackedRows] = {}
        super().__init__(sources, weights, tokenizer, **kwargs)

    def _packing(self, source: int) -> PackedRows:
        if source not in self._packings:
            examples = self._sources[source]
            order = (self._rng(_DOC_ORDER_STREAM, source).permutation(examples.num_examples) if self._shuffle
                     else np.arange(examples.num_examples))
            self._packings[source] = PackedRows(examples, order, self._seq_len, pad_id=self._special["pad_id"])
        return self._packings[source]

    def _count_rows(self, source: int) -> int:
        return self._packing(source).num_rows

    def _epoch(self, source: int, epoch: int) -> tuple[PackedRows, np.ndarray]:
        cached = self._layouts.get(source)
        if cached is None or cached[0] != epoch:
            rows = self._count_rows(source)
            order = (self._rng(_ROW_ORDER_STREAM, source, epoch).permutation(rows) if self._shuffle
                     else np.arange(rows))
            cached = self._layouts[source] = (epoch, self._packing(source), order)
        return cached[1], cached[2]


def make_sft_train_iterator(cfg: DataConfig, tokenizer, *, seq_len: int, global_batch_size: int,
                            process_index: int = 0, process_count: int = 1) -> SFTTrainIterator:
    """Reads, renders and tokenizes every conversation now, so a bad record fails before any compile."""
    _check_seq_len(seq_len)
    _rows_for_host(global_batch_size, process_index, process_count)
    template = ChatTemplate(cfg.chat_template, tokenizer, date=cfg.chat_date or None)
    sources = [encode_source(src, template, seq_len) for src in cfg.sources]
    return SFTTrainIterator(sources, [src.weight for src in cfg.sources], tokenizer, seq_len=seq_len,
                            global_batch_size=global_batch_size, process_index=process_index,
                            process_count=process_count, seed=cfg.seed, shuffle=cfg.shuffle)


def make_sft_eval_batches(cfg: DataConfig, tokenizer, *, seq_len: int, batch_size: int, process_index: int = 0,
                          process_count: int = 1, max_batches: int | None = None) -> Iterator[dict]:
    """One pass over the validation conversations in file order (this host's rows of each global batch);
    the last batch is filled with empty rows. Conversations are read and tokenized before this returns."""
    _check_seq_len(seq_len)
    rows = _rows_for_host(batch_size, process_index, process_count)
    my_rows = slice(process_index * rows, (process_index + 1) * rows)
    template = ChatTemplate(cfg.chat_template, tokenizer, date=cfg.chat_date or None)
    examples = concat_examples([encode_source(src, template, seq_len) for src in _validation_sources(cfg)])
    packed = PackedRows(examples, np.arange(examples.num_examples), seq_len, pad_id=tokenizer.pad_id)
    num_batches = -(-packed.num_rows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    empty = padding_row(seq_len, tokenizer.pad_id, with_bytes=False)

    def batches():
        for b in range(num_batches):
            global_rows = range(b * batch_size, (b + 1) * batch_size)[my_rows]
            yield _stack([packed.row(r) if r < packed.num_rows else empty for r in global_rows])

    return batches()
