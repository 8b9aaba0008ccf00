"""Mixing curated sources in fixed token proportions, with a cap on passes (epochs) per source.

The mixture is as large as the sources allow: with weights w_s (normalised) and at most e_s passes over
a source of T_s tokens, the total is B = min_s T_s * e_s / w_s, and source s contributes w_s * B tokens:
whole passes over it plus a fixed part of one more (its documents in content-hash order, so the choice
does not depend on how the curation was sharded). The selected documents are shuffled with a seed and
cut into shards of about `shard_tokens` tokens.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Words and punctuation marks: a tokenizer-free estimate of the token count."""
    return len(_TOKEN.findall(text))


def content_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Doc:
    """A curated document; `id` (and `url`, for crawl pages) trace it back to its raw input."""

    source: str
    text: str
    tokens: int
    id: str = ""
    url: str = ""


def select(docs: list[Doc], target_tokens: float) -> list[Doc]:
    """Whole passes over `docs` plus the prefix (in content-hash order) that comes nearest the target."""
    ordered = sorted(docs, key=lambda d: content_key(d.text))
    total = sum(d.tokens for d in ordered)
    if total == 0:
        return []
    passes, remainder = divmod(target_tokens, total)
    chosen = ordered * int(passes)
    taken = 0
    for doc in ordered:
        if taken + doc.tokens / 2 > remainder:
            break
        chosen.append(doc)
        taken += doc.tokens
    return chosen


def plan_mixture(sources: dict[str, list[Doc]], weights: dict[str, float], epochs: dict[str, float]) -> dict:
    """{source: selected docs} and per-source accounting, for the sources with documents."""
    present = {name: docs for name, docs in sources.items() if sum(d.tokens for d in docs) > 0}
    if not present:
        raise ValueError("mixture: no curated source has any document left")
    weight_sum = sum(weights[name] for name in present)
    share = {name: weights[name] / weight_sum for name in present}
    available = {name: sum(d.tokens for d in docs) for name, docs in present.items()}
    budget = min(available[name] * epochs[name] / share[name] for name in present)
    selected = {name: select(docs, share[name] * budget) for name, docs in present.items()}
    return {"selected": selected, "share": share, "available": available}


def interleave_into_shards(selected: dict[str, list[Doc]], shard_tokens: int, seed: int) -> list[list[Doc]]:
    docs = [d for name in sorted(selected) for d in selected[name]]
    random.Random(seed).shuffle(docs)
    shards, current, size = [], [], 0
    for doc in docs:
        current.append(doc)
        size += doc.tokens
        if size >= shard_tokens:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards
