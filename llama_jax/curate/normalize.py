"""The text normalisation CCNet applies before its language model sees a line.

Its purpose is to make the model score wording, not typography: case, accents, digit values and the
many Unicode spellings of quotes and dashes are folded away, and non-printing characters dropped. The
same function prepares the KenLM training text and the text scored, so both sides agree.
"""
from __future__ import annotations

import re
import unicodedata

_PUNCTUATION = str.maketrans({
    "«": '"', "»": '"', "“": '"', "”": '"', "„": '"', "‘": "'", "’": "'", "‚": "'", "´": "'", "`": "'",
    "–": "-", "—": "-", "―": "-", "−": "-", "…": "...", "，": ",", "。": ". ", "、": ",", "：": ":",
    "；": ";", "？": "?", "！": "!", "（": "(", "）": ")", "［": "[", "］": "]", "％": "%", "\u00a0": " ",
})
_DIGIT = re.compile(r"\d")
_ASCII_CONTROL = dict.fromkeys([*range(32), 127])  # the only ASCII characters of the categories removed
_SPACES = re.compile(r"\s+")


def normalize_line(line: str) -> str:
    """Lowercase, accents stripped, digits as 0, Unicode punctuation as ASCII, control characters
    removed, whitespace collapsed."""
    line = line.lower().translate(_PUNCTUATION)
    if line.isascii():  # most lines: NFD leaves them as they are, and only control characters go (2x faster)
        line = line.translate(_ASCII_CONTROL)
    else:
        line = "".join(c for c in unicodedata.normalize("NFD", line)
                       if unicodedata.category(c) not in ("Mn", "Cc", "Cf", "Co", "Cs"))
    line = _DIGIT.sub("0", line)
    return _SPACES.sub(" ", line).strip()


def normalized_lines(text: str) -> list[str]:
    """The document's non-empty lines, normalised."""
    return [n for n in (normalize_line(line) for line in text.split("\n")) if n]
