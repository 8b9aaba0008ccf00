"""Batches for training (infinite, shuffled, mixed, resumable) and evaluation (one finite pass).

Training. Each source is packed epoch by epoch (see `packing.py`). Per source and epoch, the document
order and the order of the packed rows are permutations drawn from (seed, source, epoch), so every epoch
is reshuffled yet reproducible. Global batch b has `global_batch_size` rows; the source of each row is
drawn from the mixture weights with a generator seeded by (seed, b); a source's rows are consumed in its
own order, epoch after epoch, so the mixture never drops or repeats a row within a source's epoch.
Process p of P builds only rows [p*n, (p+1)*n) of each global batch (n = global_batch_size // P): the
same rows a single process would put there, so the hosts' slices are disjoint and together make up the
global batch. The whole state is the batch counter plus how many rows each source has given: a tiny
JSON-serialisable dict; restoring it in a fresh iterator reproduces exactly the batches that follow.
Plain numpy, not grain: any row of any epoch is computed directly from (source, epoch, row), so the
state stays a few integers, a host builds only its own rows, and nothing beyond numpy is imported.

Evaluation. The validation sources' documents, in order and unshuffled, are packed the same way into one
finite pass; the last batch is filled with empty rows. Each row also carries `num_bytes`: the UTF-8
bytes of document text its loss-masked targets account for (each token is credited the text bytes it
completes, see `Tokenizer.encode_with_byte_counts`; BOS/EOS/padding count 0). Over a full pass the
counts add up to exactly `len(validation_text(cfg))`, so bits per byte = sum(NLL) / ln 2 / sum(num_bytes)
compares directly with a compressor run on `validation_text(cfg)`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from llama_jax.data.config import DataConfig, SourceConfig
from llama_jax.data.packing import EpochLayout, padding_row, rows_per_epoch
from llama_jax.data.sources import read_documents
from llama_jax.data.tokens import TokenizedDocs, concat_docs, load_tokenized

_MIXTURE_STREAM, _DOC_ORDER_STREAM, _ROW_ORDER_STREAM = 0, 1, 2


def _rows_for_host(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index} "
                         f"(process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                         f"process_count ({process_count})")
    return global_batch_size // process_count


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class TrainIterator:
    """This host's slice of every global training batch, forever; `get_state`/`set_state` resume it."""

    def __init__(self, sources: list[TokenizedDocs], weights: list[float], tokenizer, *, seq_len: int,
                 global_batch_size: int, process_index: int, process_count: int, seed: int, shuffle: bool):
        self._sources = sources
        self._probabilities = np.asarray(weights, np.float64) / np.sum(weights)
        self._special = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        self._seq_len, self._global_batch = seq_len, global_batch_size
        rows = _rows_for_host(global_batch_size, process_index, process_count)
        self._my_rows = slice(process_index * rows, (process_index + 1) * rows)
        self._seed, self._shuffle = seed, shuffle
        self._rows_per_epoch = [self._count_rows(s) for s in range(len(sources))]
        self._layouts: dict[int, tuple[int, EpochLayout, np.ndarray]] = {}
        self._batch = 0
        self._source_rows = [0] * len(sources)

    def __iter__(self) -> "TrainIterator":
        return self

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self._seed, *keys])

    def _count_rows(self, source: int) -> int:
        """Rows in one epoch of `source` (the same every epoch)."""
        return rows_per_epoch(self._sources[source], self._seq_len)

    def _epoch(self, source: int, epoch: int) -> tuple[EpochLayout, np.ndarray]:
        """The layout and row order of one source's epoch (the last one used is kept)."""
        cached = self._layouts.get(source)
        if cached is None or cached[0] != epoch:
            docs, num_rows = self._sources[source], self._rows_per_epoch[source]
            if self._shuffle:
                doc_order = self._rng(_DOC_ORDER_STREAM, source, epoch).permutation(docs.num_docs)
                row_order = self._rng(_ROW_ORDER_STREAM, source, epoch).permutation(num_rows)
            else:
                doc_order, row_order = np.arange(docs.num_docs), np.arange(num_rows)
            cached = (epoch, EpochLayout(docs, doc_order, self._seq_len, **self._special), row_order)
            self._layouts[source] = cached
        return cached[1], cached[2]

    def __next__(self) -> dict[str, np.ndarray]:
        if len(self._sources) == 1:
            choice = np.zeros(self._global_batch, np.int64)
        else:
            choice = self._rng(_MIXTURE_STREAM, self._batch).choice(
                len(self._sources), size=self._global_batch, p=self._probabilities)
        # Row j of the global batch is row number source_index[j] of source choice[j].
        source_index = np.empty(self._global_batch, np.int64)
        for s in range(len(self._sources)):
            picked = np.flatnonzero(choice == s)
            source_index[picked] = self._source_rows[s] + np.arange(len(picked))
            self._source_rows[s] += len(picked)
        rows = []
        for s, k in zip(choice[self._my_rows], source_index[self._my_rows]):
            epoch, i = divmod(int(k), self._rows_per_epoch[s])
            layout, row_order = self._epoch(int(s), epoch)
            rows.append(layout.row(int(row_order[i])))
        self._batch += 1
        return _stack(rows)

    def get_state(self) -> dict:
        """Where the iterator is: JSON-serialisable, a few integers."""
        return {"batch": self._batch, "source_rows": list(self._source_rows),
                "seq_len": self._seq_len, "global_batch_size": self._global_batch}

    def set_state(self, state: dict) -> None:
        """Continue from `state` (from `get_state` of an iterator built with the same arguments)."""
        expected = {"seq_len": self._seq_len, "global_batch_size": self._global_batch}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"data iterator state has {key}={state.get(key)!r}, this iterator has {value}")
        if len(state.get("source_rows", ())) != len(self._sources):
            raise ValueError(f"data iterator state has {len(state.get('source_rows', ()))} sources' "
                             f"counters, this iterator has {len(self._sources)} sources")
        self._batch = int(state["batch"])
        self._source_rows = [int(n) for n in state["source_rows"]]


def make_train_iterator(cfg: DataConfig, tokenizer, *, seq_len: int, global_batch_size: int,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """The training iterator of `cfg`: reads and tokenizes every source now, so bad input fails here."""
    _check_seq_len(seq_len)
    _rows_for_host(global_batch_size, process_index, process_count)
    sources = [load_tokenized(src, tokenizer, cache_dir=cfg.cache_dir) for src in cfg.sources]
    return TrainIterator(sources, [src.weight for src in cfg.sources], tokenizer, seq_len=seq_len,
                         global_batch_size=global_batch_size, process_index=process_index,
                         process_count=process_count, seed=cfg.seed, shuffle=cfg.shuffle)


def _validation_sources(cfg: DataConfig) -> list[SourceConfig]:
    if not cfg.validation_sources:
        raise ValueError("data.validation_sources is empty: no validation data is configured")
    return cfg.validation_sources


def make_eval_batches(cfg: DataConfig, tokenizer, *, seq_len: int, batch_size: int, process_index: int = 0,
                      process_count: int = 1, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over the validation sources; batches also carry "num_bytes" [rows] int64.

    `batch_size` is global; this host gets rows [p*n, (p+1)*n) of each batch. The sources are read and
    tokenized before this returns (bad input fails here); batches are then built lazily.
    """
    _check_seq_len(seq_len)
    rows = _rows_for_host(batch_size, process_index, process_count)
    docs = concat_docs([load_tokenized(src, tokenizer, cache_dir=cfg.cache_dir, with_bytes=True)
                        for src in _validation_sources(cfg)])
    layout = EpochLayout(docs, np.arange(docs.num_docs), seq_len, bos_id=tokenizer.bos_id,
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    num_batches = -(-layout.num_rows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    return _eval_batches(layout, num_batches, batch_size, slice(process_index * rows, (process_index + 1) * rows))


def _eval_batches(layout: EpochLayout, num_batches: int, batch_size: int, my_rows: slice):
    empty = padding_row(layout.seq_len, layout.pad_id, with_bytes=True)
    for b in range(num_batches):
        global_rows = range(b * batch_size, (b + 1) * batch_size)[my_rows]
        batch = _stack([layout.row(r) if r < layout.num_rows else empty for r in global_rows])
        batch["num_bytes"] = batch.pop("target_bytes").sum(axis=1, dtype=np.int64)
        yield batch


def validation_text(cfg: DataConfig) -> bytes:
    """The validation documents' UTF-8 bytes, concatenated in evaluation order (what num_bytes counts)."""
    return b"".join(doc.encode("utf-8") for src in _validation_sources(cfg) for doc in read_documents(src))
