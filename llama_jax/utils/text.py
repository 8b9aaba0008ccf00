"""Checks on text read from outside files."""
from __future__ import annotations


def lone_surrogate(text: str) -> str | None:
    """What is wrong with `text` if it holds a lone surrogate code point, else None.

    Valid JSON can spell one (`"\\udcff"`); Python decodes it into a string that has no UTF-8 encoding, so
    every tokenizer fails on it later, with a traceback far from the file. Readers call this per record to
    refuse (or skip) it with the file and line instead.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} (not Unicode text)"
    return None
