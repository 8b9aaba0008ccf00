"""Answers of generative tasks: normalisation, exact match and majority vote.

- "squad" (NaturalQuestions, TriviaQA): SQuAD's normalisation of both sides — lower case, punctuation
  removed, the articles a/an/the removed, whitespace collapsed; a completion is right when it equals
  any normalised answer.
- "gsm8k": the number the completion gives, as lm-evaluation-harness's GSM8k filters find it — after
  "#### " when present ("strict-match"), else the last number in the text ("flexible-extract") —
  compared with the answer's number (the text after "#### " in a GSM8k solution), both without
  thousands separators, dollar signs and a final period.
- "exact": the stripped strings.

maj@k: the most common extracted answer of k sampled completions (the first one reached on a tie, as
lm-evaluation-harness's `majority_vote` returns it), then exact match.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

ANSWER_FORMATS = ("squad", "gsm8k", "exact")
_PUNCTUATION = set(string.punctuation)
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def squad_normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _plain_number(text: str) -> str:
    return re.sub(r"\.$", "", text.replace(",", "").replace("$", "").strip())


def gsm8k_extract(completion: str) -> str:
    strict = _STRICT.search(completion)
    if strict:
        return _plain_number(strict.group(1))
    found = _FLEXIBLE.findall(completion)
    if not found:
        return ""
    last = found[-1]
    return _plain_number(last[0] or last[1])


def gsm8k_target(answer: str) -> str:
    return _plain_number(answer.split("#### ")[-1])


def extract(completion: str, fmt: str) -> str:
    """The part of a completion that is compared with the answers, in comparable form."""
    if fmt == "squad":
        return squad_normalize(completion)
    if fmt == "gsm8k":
        return gsm8k_extract(completion)
    return completion.strip()


def normalize_answer(answer: str, fmt: str) -> str:
    if fmt == "gsm8k":
        return gsm8k_target(answer)
    return squad_normalize(answer) if fmt == "squad" else answer.strip()


def is_correct(completion: str, answers: Sequence[str], fmt: str) -> bool:
    return extract(completion, fmt) in {normalize_answer(a, fmt) for a in answers}


def majority(completions: Sequence[str], fmt: str) -> str:
    """The most common extracted answer (ties: the first reached), as text to compare."""
    return Counter(extract(c, fmt) for c in completions).most_common(1)[0][0]
