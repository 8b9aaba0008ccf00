"""Hypothesis settings shared by the fuzz tests: a few hundred examples per property in every run, ten
times as many in a `slow`-marked twin (CI runs both)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 200
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True)
                           | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(
                               st.text(max_size=5), c, max_size=3), max_leaves=6)


def fast_and_slow(check, **strategies):
    """(test, slow test): `check` under hypothesis with EXAMPLES examples, and a slow twin with 10 × as many."""
    def build(examples):
        return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))(
            given(**strategies)(check))
    return build(EXAMPLES), pytest.mark.slow(build(10 * EXAMPLES))
