"""Perplexity and bits per byte of documents, long ones scored in windows.

A document is [BOS] + its tokens when the tokenizer's convention puts BOS in front (`Tokenizer.adds_bos`;
`bos=True`/`False` overrides it); without BOS its first token is context only.
Every token after the first is predicted exactly once. Two window schemes:

- Rolling (the default): lm-evaluation-harness's `loglikelihood_rolling` (its
  `get_rolling_token_windows(..., context_len=1)` followed by `make_disjoint_window`). The first window
  is the document's first `context_len + 1` tokens and predicts all but the first; every later window
  predicts the next `context_len` tokens (fewer in the last) with the one token before them, and
  further back as many as fit, as context: each window is `context_len + 1` tokens, i.e. exactly
  `context_len` model inputs. Numbers are then lm-evaluation-harness's to the last token.
- Strided (`stride` given): the standard definition of Hugging Face's perplexity guide. Windows begin
  every `stride` tokens and span `context_len` tokens (the last one stops at the document's end); the
  first window predicts all its tokens, each later one only the tokens past the previous window's end,
  with at least `context_len - stride` tokens of context. A smaller stride buys more context with
  more compute.

Reported: mean negative log-likelihood per predicted token (nats), perplexity = exp(mean NLL), and bits
per byte = total NLL / ln 2 / total UTF-8 bytes of the documents, which does not depend on the
tokenizer (every byte of the text is predicted by some token; BOS is not text). Without BOS the first
token of each document is context only, yet its bytes still count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llama_jax.evaluation.scoring import TokenScorer


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float  # nats, over all predicted tokens
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the documents
    documents: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(mean NLL); inf past float range (a mean NLL above ~709.78 nats, e.g. a broken model)."""
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return math.inf

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return {"mean_nll": self.mean_nll, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents, "nll_sum": self.nll_sum}


def strided_windows(n_tokens: int, context_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over tokens [0, n_tokens).

    Windows begin at multiples of `stride` and end `context_len` tokens later (or at the document's
    end, where the last one stops); each scores the tokens from the previous window's end to its own,
    so tokens 1..n-1 are scored exactly once. stride < context_len keeps at least one token of context.
    """
    if context_len < 2:
        raise ValueError(f"context length must be >= 2, got {context_len}")
    if not 1 <= stride < context_len:
        raise ValueError(f"stride must be in [1, context length - 1 = {context_len - 1}], got {stride}")
    windows, prev_end, begin = [], 1, 0
    while True:
        end = min(begin + context_len, n_tokens)
        windows.append((begin, end, prev_end))
        if end == n_tokens:
            return windows
        prev_end, begin = end, begin + stride


def rolling_windows(n_tokens: int, context_len: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of lm-evaluation-harness's rolling windows over [0, n_tokens).

    Token 0 (BOS) is the first window's context; each window holds at most `context_len + 1` tokens
    and predicts up to `context_len` new ones; later windows reach back to fill their length.
    """
    if context_len < 1:
        raise ValueError(f"context length must be >= 1, got {context_len}")
    windows, end = [], 1
    while end < n_tokens:
        first, end = end, min(end + context_len, n_tokens)
        windows.append((max(0, end - context_len - 1), end, first))
    return windows


def token_logprobs(scorer: TokenScorer, documents: Sequence[Sequence[int]], *, context_len: int,
                   stride: int | None = None) -> list[np.ndarray]:
    """log p of tokens 1..n-1 of each token document, each predicted once (rolling windows, or strided
    ones when `stride` is given)."""
    if context_len > scorer.max_len:
        raise ValueError(f"context length {context_len} exceeds the scorer's maximum {scorer.max_len}")
    docs = [np.asarray(d, np.int32) for d in documents]
    pieces, where = [], []
    for d, tokens in enumerate(docs):
        if len(tokens) < 2:
            raise ValueError(f"document {d} has {len(tokens)} token(s): nothing to predict")
        windows = (rolling_windows(len(tokens), context_len) if stride is None
                   else strided_windows(len(tokens), context_len, stride))
        for begin, end, first in windows:
            pieces.append(tokens[begin:end])
            where.append((d, begin, first))
    scores = scorer.score(pieces)
    out = [[] for _ in docs]
    for (d, begin, first), (logp, _) in zip(where, scores):
        out[d].append(logp[first - begin - 1:])  # logp[k] is token begin + k + 1
    return [np.concatenate(parts) for parts in out]


def evaluate_perplexity(scorer: TokenScorer, texts: Sequence[str], tokenizer, *, context_len: int | None = None,
                        stride: int | None = None, bos: bool | None = None) -> PerplexityResult:
    """Perplexity and bits per byte of `texts` (context_len defaults to the scorer's maximum; rolling
    windows unless a `stride` is given)."""
    context_len = scorer.max_len if context_len is None else context_len
    bos = tokenizer.adds_bos if bos is None else bos
    docs = [tokenizer.encode(t, bos=bos) for t in texts]
    kept = [(t, d) for t, d in zip(texts, docs) if len(d) >= 2]
    if not kept:
        raise ValueError("no document has a token to predict (each needs at least 2 tokens with BOS)")
    logps = token_logprobs(scorer, [d for _, d in kept], context_len=context_len, stride=stride)
    return PerplexityResult(nll_sum=-float(sum(lp.sum() for lp in logps)), tokens=sum(len(lp) for lp in logps),
                            bytes=sum(len(t.encode("utf-8")) for t, _ in kept), documents=len(kept))
