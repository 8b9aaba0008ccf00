"""Book-level dedup: drop a book sharing >= `threshold` of its content with another book.

Content overlap of books A and B = |n-grams(A) & n-grams(B)| / min(|n-grams(A)|, |n-grams(B)|), over
word n-grams: the share of the shorter book found in the other. Candidate pairs come from a sample of
each book's n-gram hashes (those divisible by `sample_every`, a content-defined sample, so two copies
sample the same n-grams); every candidate pair is then measured exactly, so the 90% line is sharp. Of an
overlapping pair the longer book stays (ties: the smaller id). Runs as one task: every book is compared
with every other, which needs them all in one place.
"""
from __future__ import annotations

from collections import defaultdict

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from llama_jax.curate.config import BookDedupConfig


def ngram_hashes(text: str, n: int) -> set[int]:
    import xxhash

    words = text.split()
    return {xxhash.xxh64_intdigest(" ".join(words[i:i + n])) for i in range(max(len(words) - n + 1, 1))}


def overlap(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(min(len(a), len(b)), 1)


def books_to_drop(books: list[tuple[str, str]], cfg: BookDedupConfig) -> set[str]:
    """Ids of the books (id, text) to drop."""
    grams = {book_id: ngram_hashes(text, cfg.n_grams) for book_id, text in books}
    index: dict[int, list[str]] = defaultdict(list)
    for book_id, hashes in grams.items():
        for h in hashes:
            if h % cfg.sample_every == 0:
                index[h].append(book_id)
    candidates = {(a, b) for ids in index.values() for i, a in enumerate(ids) for b in ids[i + 1:]}
    rank = {book_id: (-len(hashes), book_id) for book_id, hashes in grams.items()}  # keep order: longest first
    dropped = set()
    for a, b in sorted(candidates, key=lambda pair: sorted((rank[pair[0]], rank[pair[1]]))):
        if a in dropped or b in dropped:
            continue
        if overlap(grams[a], grams[b]) >= cfg.threshold:
            dropped.add(max(a, b, key=lambda x: rank[x]))
    return dropped


class BookOverlapDedup(PipelineStep):
    name = "📕 book overlap dedup"
    type = "🫂 - DEDUP"

    def __init__(self, cfg: BookDedupConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        docs: list[Document] = list(data or ())
        dropped = books_to_drop([(doc.id, doc.text) for doc in docs], self.cfg)
        self.stat_update("dropped", value=len(dropped))
        yield from (doc for doc in docs if doc.id not in dropped)
