"""Tokenize a source once into flat arrays (ids + document offsets), optionally cached on disk.

Packing needs every document's length up front (to lay an epoch out exactly), so each source is
tokenized completely once, in chunks, with the tokenizer's multi-threaded batch encoder. With a
`cache_dir`, the arrays are kept in an `.npz` keyed by the source fingerprint and the tokenizer file's
hash, written through a rename so concurrent processes never read a partial file. Every host tokenizes
the whole source (it needs all lengths) but later reads only its own rows.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from llama_jax.utils.files import write_atomically
from llama_jax.data.config import SourceConfig
from llama_jax.data.sources import read_documents, source_fingerprint

_CACHE_FORMAT = 1
_CHUNK_DOCS = 512


@dataclass(frozen=True)
class TokenizedDocs:
    """Documents as token ids without BOS/EOS: document d is ids[offsets[d]:offsets[d+1]].

    byte_counts (validation only): for each token, the bytes of source text it accounts for
    (`Tokenizer.encode_with_byte_counts`); per document they sum to the document's UTF-8 length.
    """

    ids: np.ndarray
    offsets: np.ndarray
    byte_counts: np.ndarray | None = None

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _flatten(per_doc: list, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=dtype) for x in per_doc]) if per_doc else np.zeros(0, dtype)


def tokenize_documents(docs: Sequence[str], tokenizer, *, with_bytes: bool = False) -> TokenizedDocs:
    """Token ids of every document (and byte counts when asked), in chunks to bound memory."""
    ids, lengths, counts = [], [], []
    for start in range(0, len(docs), _CHUNK_DOCS):
        chunk = docs[start:start + _CHUNK_DOCS]
        if with_bytes:
            pairs = [tokenizer.encode_with_byte_counts(d) for d in chunk]
            encoded = [p[0] for p in pairs]
            counts.append(_flatten([p[1] for p in pairs], np.int32))
        else:
            encoded = tokenizer.encode_batch(chunk)
        ids.append(_flatten(encoded, np.int32))
        lengths.extend(len(e) for e in encoded)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return TokenizedDocs(_flatten(ids, np.int32), offsets, _flatten(counts, np.int32) if with_bytes else None)


def concat_docs(parts: Sequence[TokenizedDocs]) -> TokenizedDocs:
    """Several tokenized sources as one, documents in order."""
    offsets = [parts[0].offsets]
    for p in parts[1:]:
        offsets.append(offsets[-1][-1] + p.offsets[1:])
    counts = None if parts[0].byte_counts is None else np.concatenate([p.byte_counts for p in parts])
    return TokenizedDocs(np.concatenate([p.ids for p in parts]), np.concatenate(offsets), counts)


def load_tokenized(src: SourceConfig, tokenizer, *, cache_dir: str = "", with_bytes: bool = False) -> TokenizedDocs:
    """The tokenized documents of `src`, from the cache when it has them."""
    if not cache_dir:
        return tokenize_documents(read_documents(src), tokenizer, with_bytes=with_bytes)
    key = hashlib.sha256(f"{_CACHE_FORMAT}\n{source_fingerprint(src)}\n{tokenizer.fingerprint()}\n"
                         f"{with_bytes}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"tokens-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return TokenizedDocs(z["ids"], z["offsets"], z["byte_counts"] if with_bytes else None)
    docs = tokenize_documents(read_documents(src), tokenizer, with_bytes=with_bytes)
    arrays = dict(ids=docs.ids, offsets=docs.offsets)
    if with_bytes:
        arrays["byte_counts"] = docs.byte_counts
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())
    return docs
