"""Pack documents into fixed-length rows: one epoch of one source laid out as a token stream.

The epoch's documents, in the epoch's order, form one stream  BOS d0 EOS BOS d1 EOS ...  of T tokens.
Row r holds stream tokens [r*L, r*L + L + 1) (L = seq_len): inputs are its first L tokens, targets its
last L. Consecutive rows overlap by exactly one token (row r's last target is row r+1's first input), so
every stream token except the very first is a target exactly once per epoch: no token is lost or
duplicated. There are ceil((T - 1) / L) rows; the last one is padded.

Inside a row, each document (or piece of one cut at a row boundary) is a segment: segment ids 1, 2, ...
in order, 0 on padding, and positions restart at 0 at each segment's first token. The attention function
receives the segment ids, so a row's documents never attend to each other; a document cut at a row
boundary continues in the next row as a fresh segment. The loss mask is 1 where the target is the next
token of the same segment: 0 on padding and where the input is a document's EOS (the target would be the
next document's BOS). Every content token and every EOS is therefore a counted target exactly once.
"""
from __future__ import annotations

import numpy as np

from llama_jax.data.tokens import TokenizedDocs

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def rows_per_epoch(docs: TokenizedDocs, seq_len: int) -> int:
    """ceil((T - 1) / seq_len) with T = all document tokens + a BOS and an EOS per document."""
    stream_len = int(docs.offsets[-1]) + 2 * docs.num_docs
    return -(-(stream_len - 1) // seq_len)


class EpochLayout:
    """One epoch of `docs` in document order `order`, cut into rows of seq_len + 1 tokens."""

    def __init__(self, docs: TokenizedDocs, order: np.ndarray, seq_len: int, *, bos_id: int, eos_id: int,
                 pad_id: int):
        self.docs, self.order, self.seq_len = docs, order, seq_len
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.starts = np.concatenate([[0], np.cumsum(docs.lengths[order] + 2)])  # stream offset per doc
        self.num_rows = rows_per_epoch(docs, seq_len)

    def row(self, r: int) -> dict[str, np.ndarray]:
        """Row r as [seq_len] arrays (BATCH_KEYS; plus "target_bytes" when docs carry byte counts)."""
        n = self.seq_len + 1
        tokens = np.full(n, self.pad_id, np.int32)
        segments = np.zeros(n, np.int32)
        positions = np.zeros(n, np.int32)
        byte_counts = None if self.docs.byte_counts is None else np.zeros(n, np.int32)
        row_start = r * self.seq_len
        row_end = min(row_start + n, int(self.starts[-1]))
        k = int(np.searchsorted(self.starts, row_start, side="right")) - 1
        segment = 0
        while k < len(self.order) and self.starts[k] < row_end:
            # The part of document k in this row: in-document indices [q_lo, q_hi), where index 0 is
            # BOS, 1..n the n content tokens and n + 1 the EOS; it starts at row index `at`.
            doc_start, doc_len = int(self.starts[k]), int(self.starts[k + 1] - self.starts[k])
            q_lo, q_hi = max(row_start, doc_start) - doc_start, min(row_end, doc_start + doc_len) - doc_start
            at = doc_start + q_lo - row_start
            segment += 1
            segments[at:at + q_hi - q_lo] = segment
            positions[at:at + q_hi - q_lo] = np.arange(q_hi - q_lo)
            c_lo, c_hi = max(q_lo, 1), min(q_hi, doc_len - 1)  # the content indices in the part
            first = int(self.docs.offsets[self.order[k]]) - 1  # ids index of in-document index 0
            src = slice(first + c_lo, first + c_hi)
            dst = slice(at + c_lo - q_lo, at + c_hi - q_lo)
            tokens[dst] = self.docs.ids[src]
            if byte_counts is not None:
                byte_counts[dst] = self.docs.byte_counts[src]
            if q_lo == 0:
                tokens[at] = self.bos_id
            if q_hi == doc_len:
                tokens[at + q_hi - q_lo - 1] = self.eos_id
            k += 1
        loss_mask = (segments[:-1] != 0) & (segments[1:] == segments[:-1])
        example = {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": segments[:-1],
                   "positions": positions[:-1], "loss_mask": loss_mask.astype(np.float32)}
        if byte_counts is not None:
            example["target_bytes"] = byte_counts[1:] * loss_mask
        return example


def padding_row(seq_len: int, pad_id: int, *, with_bytes: bool) -> dict[str, np.ndarray]:
    """A row with no tokens, filling the last batch of a finite pass to full size."""
    example = {key: np.zeros(seq_len, np.int32) for key in BATCH_KEYS}
    example["inputs"][:] = example["targets"][:] = pad_id
    example["loss_mask"] = np.zeros(seq_len, np.float32)
    if with_bytes:
        example["target_bytes"] = np.zeros(seq_len, np.int32)
    return example
