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



def lone_surrogate_in(value: object, where: str = "") -> str | None:
    """`lone_surrogate` for every string of a parsed JSON value, keys included: the first problem, prefixed
    with its place (`messages[1].content`)."""
    if isinstance(value, str):
        problem = lone_surrogate(value)
        return f"{where}: {problem}" if problem and where else problem
    if isinstance(value, dict):
        for key in value:  # a key is named by its object: printing the key itself would fail
            if (problem := lone_surrogate(key)) is not None:
                return f"a key of {where or 'the object'}: {problem}"
        children = [(f"{where}.{key}" if where else key, child) for key, child in value.items()]
    elif isinstance(value, list):
        children = [(f"{where}[{i}]", child) for i, child in enumerate(value)]
    else:
        return None
    for place, child in children:
        if (problem := lone_surrogate_in(child, place)) is not None:
            return problem
    return None
