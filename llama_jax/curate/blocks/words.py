"""Whitespace words and newline-separated lines: the tokenization our dedup stages need.

datatrove's dedup blocks take a word tokenizer per language (spaCy for English). Line dedup hashes
whole lines and MinHash hashes word n-grams of normalised text, so splitting on whitespace is all they
need, the same for every language, with no spaCy models to install.
"""
from __future__ import annotations

import re

from datatrove.utils.word_tokenizers import WordTokenizer

_LINE = re.compile(r"[^\n]+")


class WhitespaceTokenizer(WordTokenizer):
    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _LINE.finditer(text)]
