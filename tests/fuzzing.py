"""Hypothesis settings shared by the fuzz tests: a few hundred examples per property in every run (CI
included), ten times as many in a `thorough`-marked twin (`pytest -m thorough`; outside CI's time budget)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 200
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True)
                           | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(
                               st.text(max_size=5), c, max_size=3), max_leaves=6)


def fast_and_slow(check, **strategies):
    """(test, thorough test): `check` under hypothesis with EXAMPLES examples, and a twin with 10 × as many."""
    def build(examples):
        return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))(
            given(**strategies)(check))
    return build(EXAMPLES), pytest.mark.thorough(build(10 * EXAMPLES))
