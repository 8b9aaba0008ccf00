"""Runs loaded tasks on a model: few-shot prompts, then scoring, generation or code execution.

`prepare` does everything that can fail on bad input (few-shot pools, prompts, sampling settings) without
a model, so `eval.py tasks` and training report it before anything compiles. `TaskRunner` holds one
TokenScorer and one Generator per generation setting, reused across tasks and calls (training evaluates
the same tasks every few hundred steps without recompiling).

Generative tasks: greedy decoding (or, with `samples` k > 1, k completions sampled with seeds seed,
seed + 1, ...), cut at the task's stop strings; metrics exact_match (the share of right completions,
over all samples) and, with k > 1, maj@k. Code tasks: pass@k for k in 1, 10, 100 up to the samples
drawn, every program run in the sandbox (refused at `prepare` when the sandbox's container cannot run
here, unless `allow_unsafe_code`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llama_jax.evaluation import answers
from llama_jax.evaluation.code_exec import code_metrics, execute
from llama_jax.evaluation.fewshot import DEFAULT_SEED
from llama_jax.evaluation.generate import Generator, SamplingConfig, generate_texts
from llama_jax.evaluation.loading import EvalModel
from llama_jax.evaluation.sandbox import Limits, choose_isolation
from llama_jax.evaluation.scoring import TokenScorer
from llama_jax.evaluation.suite import Task, build_prompts, with_prompts
from llama_jax.evaluation.tasks import evaluate_task
from llama_jax.utils.config_io import ConfigError

PASS_KS = (1, 10, 100)


@dataclass(frozen=True)
class RunOptions:
    num_fewshot: int | None = None  # None: each task's own default
    fewshot_seed: int = DEFAULT_SEED
    limit: int | None = None
    samples: int = 1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int | None = None  # None: each task's own
    batch_size: int = 16
    bos: bool | None = None  # None: as the tokenizer's convention says (`Tokenizer.adds_bos`)
    code_limits: Limits = Limits()
    code_workers: int = 0
    allow_unsafe_code: bool = False  # run generated code with the audit hook alone where bwrap cannot run

    def __post_init__(self):
        if self.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {self.samples}")
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError(f"--samples {self.samples} needs sampling: give --temperature > 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class Prepared:
    task: Task
    items: tuple  # the task's items (limited), prompts with their few-shot examples
    prompts: tuple[str, ...]
    max_new_tokens: int


def prepare(task: Task, options: RunOptions) -> Prepared:
    """Limit, few-shot prompts and generation length of `task`: every input check, no model needed."""
    limited = task.limited(options.limit)
    prompts = build_prompts(task, options.num_fewshot, options.fewshot_seed, options.limit)
    max_new = options.max_new_tokens or task.settings.max_new_tokens
    SamplingConfig(max_new_tokens=max_new, temperature=options.temperature, top_k=options.top_k,
                   top_p=options.top_p)  # bad sampling flags fail here
    if task.kind == "code":
        choose_isolation(options.allow_unsafe_code)  # no container and no consent: refused before any model
    return Prepared(limited, with_prompts(limited, prompts), tuple(prompts), max_new)


class TaskRunner:
    """Scores prepared tasks on `model`, compiling each program once."""

    def __init__(self, model: EvalModel, options: RunOptions, *, max_len: int | None = None):
        self.model, self.options = model, options
        self.scorer = TokenScorer(model, batch_size=options.batch_size, max_len=max_len)
        self._generators: dict[tuple, Generator] = {}

    def use_params(self, params) -> None:
        """Score with `params` from now on. They must have the shapes and shardings of the model's own
        (training passes its current weights at each evaluation): the compiled programs are reused."""
        self.model = dataclasses.replace(self.model, params=params)
        self.scorer.model = self.model
        for generator in self._generators.values():
            generator.model = self.model

    def _generator(self, max_new: int) -> Generator:
        o = self.options
        key = (max_new, o.temperature, o.top_k, o.top_p)
        if key not in self._generators:
            self._generators[key] = Generator(self.model, SamplingConfig(
                max_new_tokens=max_new, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, seed=o.seed))
        return self._generators[key]

    def completions(self, prepared: Prepared) -> list[list[str]]:
        """samples[item][j]: the j-th completion of each item, cut at the task's stop strings."""
        tok, o = self.model.tokenizer, self.options
        bos = tok.adds_bos if o.bos is None else o.bos
        prompts = [tok.encode(p, bos=bos) for p in prepared.prompts]
        gen = self._generator(prepared.max_new_tokens)
        runs = [generate_texts(gen, prompts, until=prepared.task.settings.until, batch_size=o.batch_size,
                               seed=o.seed + j) for j in range(o.samples)]
        return [list(r) for r in zip(*runs)]

    def run(self, prepared: Prepared) -> tuple[dict, list[dict]]:
        """(metrics, one record per item)."""
        kind = prepared.task.kind
        if kind == "multiple_choice":
            return evaluate_task(self.scorer, self.model.tokenizer, prepared.items, bos=self.options.bos)
        samples = self.completions(prepared)
        if kind == "generate":
            return generative_metrics(prepared, samples)
        outcomes = execute(prepared.items, samples, self.options.code_limits, workers=self.options.code_workers,
                           allow_unsafe=self.options.allow_unsafe_code)
        records = [{"id": item.id, "prompt": prompt, "completions": s, "status": [o.status for o in out]}
                   for item, prompt, s, out in zip(prepared.items, prepared.prompts, samples, outcomes)]
        return code_metrics(outcomes, [k for k in PASS_KS if k <= len(samples[0])]), records


def generative_metrics(prepared: Prepared, samples: Sequence[Sequence[str]]) -> tuple[dict, list[dict]]:
    fmt = prepared.task.settings.answer_format
    k = len(samples[0])
    records, correct, voted = [], [], []
    for item, prompt, completions in zip(prepared.items, prepared.prompts, samples):
        right = [answers.is_correct(c, item.answers, fmt) for c in completions]
        vote = answers.majority(completions, fmt)
        vote_right = vote in {answers.normalize_answer(a, fmt) for a in item.answers}
        correct.append(np.mean(right))
        voted.append(vote_right)
        records.append({"id": item.id, "prompt": prompt, "answers": list(item.answers), "completions": list(completions),
                        "extracted": [answers.extract(c, fmt) for c in completions], "correct": right,
                        **({f"maj@{k}": vote, f"maj@{k}_correct": vote_right} if k > 1 else {})})
    metrics = {"exact_match": float(np.mean(correct))}
    if k > 1:
        metrics[f"maj@{k}"] = float(np.mean(voted))
    metrics["n"] = len(records)
    return metrics, records
