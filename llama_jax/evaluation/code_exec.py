"""Functional correctness of generated code: HumanEval / MBPP-style programs and pass@k.

A code item has a prompt, tests and an entry point (the function the tests exercise). Two layouts:

- "humaneval": the prompt is the function's signature and docstring, the completion its body; the
  tests define `check(candidate)`. Program = prompt + completion + tests + `check(ENTRY_POINT)`.
- "mbpp": the prompt is a task description, the completion a whole function; the tests are plain
  `assert` lines calling the entry point. Program = completion + tests.

Every program runs in `sandbox` (a bubblewrap container with limits), never here; "passed" needs the
sandbox's evidence that the whole program, tests included, ran. pass@k is the unbiased
estimator of Chen et al. (2021): with n samples of which c pass, 1 - C(n-c, k) / C(n, k), the chance
that at least one of k samples drawn without replacement passes; averaged over items.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llama_jax.evaluation.sandbox import Limits, Outcome, run_programs
from llama_jax.utils.files import json_objects

CODE_LAYOUTS = ("humaneval", "mbpp")


@dataclass(frozen=True)
class CodeItem:
    id: str
    prompt: str
    tests: str
    entry_point: str
    layout: str = "humaneval"

    def program(self, completion: str) -> str:
        """The whole program to run for `completion` (module docstring)."""
        if self.layout == "humaneval":
            return f"{self.prompt}{completion}\n\n{self.tests}\n\ncheck({self.entry_point})\n"
        return f"{completion}\n\n{self.tests}\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one item with n samples, c of them correct (needs k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) as a product, exact enough in float64 and free of huge binomials.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def execute(items: Sequence[CodeItem], completions: Sequence[Sequence[str]], limits: Limits = Limits(), *,
            workers: int = 0, allow_unsafe: bool = False) -> list[list[Outcome]]:
    """Run every completion of every item in the sandbox: outcomes[item][sample]."""
    programs = [item.program(c) for item, samples in zip(items, completions) for c in samples]
    flat = iter(run_programs(programs, limits, workers=workers, allow_unsafe=allow_unsafe))
    return [[next(flat) for _ in samples] for samples in completions]


def code_metrics(outcomes: Sequence[Sequence[Outcome]], ks: Sequence[int]) -> dict:
    """pass@k for each k that every item has enough samples for, and the item count."""
    if not outcomes:
        raise ValueError("no items to score")
    n = min(len(o) for o in outcomes)
    metrics = {}
    for k in ks:
        if k <= n:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(len(o), sum(x.passed for x in o), k) for o in outcomes]))
    metrics["n"] = len(outcomes)
    return metrics


def read_completions(path: str, items: Sequence[CodeItem]) -> tuple[list[CodeItem], list[list[str]]]:
    """The items a completions file covers and their completions, in file order. The file is the per-item
    JSONL `eval.py tasks --output-dir` writes (one {"id": ..., "completions": [...], ...} per line; other
    keys ignored); strict: every line an object with a known, unrepeated id and a non-empty list of strings."""
    by_id = {item.id: item for item in items}
    chosen, completions = [], []
    for _, where, record in json_objects(path):
        if not isinstance(record.get("id"), str):
            raise ValueError(f"{where}: expected an object with a string 'id'")
        samples = record.get("completions")
        if not isinstance(samples, list) or not samples or not all(isinstance(c, str) for c in samples):
            raise ValueError(f"{where}: 'completions' must be a non-empty list of strings")
        if record["id"] not in by_id:
            raise ValueError(f"{where}: item id {record['id']!r} is not in the task")
        if any(item.id == record["id"] for item in chosen):
            raise ValueError(f"{where}: item id {record['id']!r} appears twice")
        chosen.append(by_id[record["id"]])
        completions.append(samples)
    if not chosen:
        raise ValueError(f"{path}: no completions")
    return chosen, completions
