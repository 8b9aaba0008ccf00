"""Answer checking of generative tasks against independent implementations: SQuAD v1.1's official
normalisation (as shipped in lm-eval's qasper task) and lm-eval's own GSM8k pipeline (its stock filters:
"strict-match" when the completion says "#### N", "flexible-extract" otherwise, then its exact_match
with gsm8k.yaml's settings). hypothesis draws the texts."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_jax.evaluation import answers

qasper = pytest.importorskip("lm_eval.tasks.qasper.metrics")
from lm_eval.api.metrics import exact_match_hf_evaluate  # noqa: E402
from lm_eval.filters.extraction import RegexFilter  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None)
# gsm8k.yaml's filters and metric settings
STRICT = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)", group_select=0, fallback="[invalid]")
FLEXIBLE = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1, fallback="[invalid]")
GSM8K_METRIC = dict(regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"], ignore_case=True, ignore_punctuation=False)

words = st.lists(st.sampled_from(["The", "the", "a", "An", "Paris", "theatre", "an", "cat's", "U.S.", "  ", "\t",
                                  "—", "Ünïcode", "(x)", "A-B", "and", "", "."]), max_size=6).map(" ".join)


@FUZZ
@given(text=words | st.text(max_size=12))
def test_squad_normalisation_is_squads_official(text):
    assert answers.squad_normalize(text) == qasper.normalize_answer(text)


def test_squad_exact_match_takes_any_answer():
    assert answers.is_correct(" The Eiffel  tower.", ["Tour Eiffel", "eiffel Tower"], "squad")
    assert not answers.is_correct("Eiffel", ["Eiffel Tower"], "squad")


numbers = st.from_regex(r"-?\$?[0-9]{1,4}(,[0-9]{3})?(\.[0-9]{1,2})?\.?", fullmatch=True)
filler = st.sampled_from(["So the answer is ", "We get ", "\n", " apples and ", "Total: ", "#### ", "x", " "])
completions = st.lists(filler | numbers, max_size=6).map("".join)


def lm_eval_gsm8k_correct(completion: str, answer: str) -> bool:
    """lm-eval's score: the strict-match filter where its regex finds "#### N", else flexible-extract."""
    doc = {"answer": answer}
    strict = list(STRICT.apply([[completion]], [doc]))[0][0]
    chosen = strict if strict != "[invalid]" else list(FLEXIBLE.apply([[completion]], [doc]))[0][0]
    return exact_match_hf_evaluate([chosen], [answer], **GSM8K_METRIC)["exact_match"] == 1.0


@FUZZ
@given(completion=completions, number=numbers)
def test_gsm8k_answers_are_lm_evals(completion, number):
    answer = f"Some reasoning.\n#### {number}"
    assert answers.is_correct(completion, [answer], "gsm8k") == lm_eval_gsm8k_correct(completion, answer)


@FUZZ
@given(prefix=completions, number=numbers)
def test_gsm8k_right_answers_are_found(prefix, number):
    """Not vacuous: a completion ending in the answer (or giving it after ####) is right for both."""
    answer = f"Because.\n#### {number}"
    for completion in (f"{prefix} so {number}", f"{prefix}\n#### {number}"):
        if re.search(r"[0-9]", number):
            assert answers.is_correct(completion, [answer], "gsm8k") == lm_eval_gsm8k_correct(completion, answer)
    assert answers.is_correct(f"{prefix}\n#### {number}", [answer], "gsm8k") or "#### " in prefix


def test_gsm8k_thousands_separators_dollars_and_periods_are_stripped():
    assert answers.is_correct("So the total is $1,234.", ["Because.\n#### 1234"], "gsm8k")
    assert lm_eval_gsm8k_correct("So the total is $1,234.", "Because.\n#### 1234")


@FUZZ
@given(n=st.integers(min_value=1000, max_value=10**9), dollar=st.booleans(), period=st.booleans(),
       strict=st.booleans())
def test_gsm8k_the_same_number_with_separators_is_right(n, dollar, period, strict):
    """The same number on both sides, written with thousands separators in the completion only (the draws
    above pick the two numbers independently, so they never try this)."""
    written = f"{'$' if dollar else ''}{n:,}{'.' if period else ''}"
    completion = f"So the total is {written}" if not strict else f"So the total is {written}\n#### {n:,}"
    answer = f"Because.\n#### {n}"
    assert answers.is_correct(completion, [answer], "gsm8k")
    assert lm_eval_gsm8k_correct(completion, answer)
