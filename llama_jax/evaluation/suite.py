"""Tasks of every kind — multiple choice, generative, code — read, validated and run the same way.

A task is a JSONL file of items (one type per file, field `type`, default multiple choice):

    {"context": "Question: ...\\nAnswer:", "choices": ["a", "b"], "label": 1, "id": "q7"}
    {"type": "generate", "context": "Q: who wrote Hamlet?\\nA:", "answers": ["Shakespeare"], "target": "..."}
    {"type": "code", "prompt": "def f(x):\\n", "tests": "def check(c): ...", "entry_point": "f", "layout": "humaneval"}

(`id` optional; `target`, a generative item's answer as shown in a few-shot example, defaults to its first
answer; a code item's `layout` is "humaneval" or "mbpp", see `code_exec`, and its `target` is the
solution shown in few-shot examples.) Or a task YAML naming such a file and the task's settings:

    task: nq_open            # name (default: the file's stem)
    test: nq_test.jsonl      # items, relative to the YAML
    fewshot: nq_train.jsonl  # optional few-shot pool (default: the task's own items, never the item itself)
    num_fewshot: 5
    description: "Answer these questions:\\n\\n"
    target_delimiter: " "
    fewshot_delimiter: "\\n"
    sampler: random          # or first_n
    until: ["\\n", ".", ","]  # generative stop strings
    answer_format: squad     # squad | gsm8k | exact
    max_new_tokens: 32

Catalog names (`catalog.py`) build the same `Task`. Everything is checked when the task is loaded and its
prompts built, before a model is compiled; every problem with the input is a `TaskError` (one line naming
the task, the file and line or the item), never another exception from deeper down.
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from llama_jax.evaluation.answers import ANSWER_FORMATS
from llama_jax.evaluation.code_exec import CODE_LAYOUTS, CodeItem
from llama_jax.evaluation.fewshot import DEFAULT_SEED, Example, FewShotFormat, draw_shots
from llama_jax.evaluation.tasks import Item, shared_context_item
from llama_jax.utils.config_io import ConfigError, from_dict, load_yaml
from llama_jax.utils.files import json_objects

KINDS = ("multiple_choice", "generate", "code")


class TaskError(ConfigError):
    """Bad task input (an unknown name, a malformed file, item or setting): the one exception type the
    task readers raise, so callers report it as a user error (one line, exit 2) and nothing else is."""


@dataclass(frozen=True)
class GenItem:
    id: str
    context: str
    answers: tuple[str, ...]
    target: str


@dataclass(frozen=True)
class TaskSettings:
    """The task YAML's keys (module docstring); defaults are lm-evaluation-harness's."""

    task: str = ""
    test: str = ""
    fewshot: str = ""
    num_fewshot: int = 0
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    sampler: str = "random"
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    answer_format: str = "exact"
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.answer_format not in ANSWER_FORMATS:
            raise ConfigError(f"answer_format {self.answer_format!r} is not one of {list(ANSWER_FORMATS)}")
        if self.num_fewshot < 0 or self.max_new_tokens < 1:
            raise ConfigError("num_fewshot must be >= 0 and max_new_tokens >= 1")
        FewShotFormat(sampler=self.sampler)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    items: tuple  # Item | GenItem | CodeItem, all of `kind`
    settings: TaskSettings = TaskSettings()
    pool: tuple[Example, ...] | None = None  # few-shot examples; None: the items themselves
    source: str = ""  # file or dataset, for messages
    # Draw K + 1 shots from the separate pool and drop any equal to the item, as from the task's own items:
    # lm-eval does so for tasks with neither a test nor a few-shot split (nq_open, triviaqa).
    shots_exclude_item: bool = False

    @property
    def fewshot_format(self) -> FewShotFormat:
        s = self.settings
        return FewShotFormat(s.description, s.target_delimiter, s.fewshot_delimiter, s.sampler)

    def limited(self, limit: int | None) -> "Task":
        return self if limit is None else dataclasses.replace(self, items=self.items[:limit])


# ------------------------------------------------------------------------------------------ reading

def _string(record: dict, key: str, where: str, *, required: bool = True, empty: bool = True) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (not empty and not value):
        raise TaskError(f"{where}: key {key!r} must be a{'' if empty else ' non-empty'} string, got {value!r}")
    return value


def _parse_item(kind: str, record: dict, item_id: str, where: str):
    if kind == "multiple_choice":
        context, choices, label = _string(record, "context", where), record.get("choices"), record.get("label")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise TaskError(f"{where}: key 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
        if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices)):
            raise TaskError(f"{where}: key 'label' must be an integer in [0, {len(choices)}), got {label!r}")
        return shared_context_item(item_id, context, choices, label)
    if kind == "generate":
        context, answers = _string(record, "context", where), record.get("answers")
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)):
            raise TaskError(f"{where}: item {item_id} has no answers: key 'answers' must be a non-empty list of "
                             f"non-empty strings, got {answers!r}")
        target = _string(record, "target", where, required=False) or answers[0]
        return GenItem(item_id, context, tuple(answers), target)
    layout = record.get("layout", "humaneval")
    if layout not in CODE_LAYOUTS:
        raise TaskError(f"{where}: key 'layout' must be one of {list(CODE_LAYOUTS)}, got {layout!r}")
    entry = record.get("entry_point")
    if not (isinstance(entry, str) and entry.isidentifier()):
        raise TaskError(f"{where}: code item {item_id} has no entry point: key 'entry_point' must name a "
                         f"function, got {entry!r}")
    return CodeItem(item_id, _string(record, "prompt", where), _string(record, "tests", where, empty=False),
                    entry, layout), _string(record, "target", where, required=False)


def read_items(path: str, task: str) -> tuple[str, list, list[str | None]]:
    """(kind, items, code solutions for few-shot) of a task JSONL file; strict, errors name file:line."""
    kind, items, solutions = None, [], []
    for number, where, record in json_objects(path, TaskError, f"task {task}: "):
        line_kind = record.get("type", "multiple_choice")
        if line_kind not in KINDS:
            raise TaskError(f"{where}: key 'type' must be one of {list(KINDS)}, got {line_kind!r}")
        if kind is not None and line_kind != kind:
            raise TaskError(f"{where}: type {line_kind!r} differs from the file's first item ({kind!r})")
        kind = line_kind
        raw_id = record.get("id", number)
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
            raise TaskError(f"{where}: key 'id' must be a string or an integer, got {raw_id!r}")
        parsed = _parse_item(kind, record, str(raw_id), where)
        if kind == "code":
            parsed, solution = parsed
            solutions.append(solution)
        items.append(parsed)
    if not items:
        raise TaskError(f"task {task}: {path} holds no items")
    return kind, items, solutions


def examples_of(kind: str, items: Sequence, solutions: Sequence[str | None] = (), task: str = "") -> list[Example]:
    """Items as few-shot examples: (prompt text, the answer shown)."""
    if kind == "multiple_choice":
        return [Example(i.contexts[0], i.continuations[i.label].removeprefix(" ")) for i in items]
    if kind == "generate":
        return [Example(i.context, i.target) for i in items]
    missing = [i.id for i, s in zip(items, solutions) if s is None]
    if missing or not solutions:
        raise TaskError(f"task {task}: code item {missing[0] if missing else items[0].id} has no 'target' "
                         f"solution to show as a few-shot example")
    return [Example(i.prompt, s) for i, s in zip(items, solutions)]


def load_task_file(path: str) -> Task:
    """A task JSONL file (zero-shot defaults) or a task YAML (module docstring)."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        try:
            data = load_yaml(p)
            bad_key = next((k for k in data if not (isinstance(k, str) and k.isidentifier())), None)
            if bad_key is not None:
                raise ConfigError(f"{path}: key {bad_key!r} is not a name")
            settings = from_dict(TaskSettings, data)
        except (ConfigError, ValueError, RecursionError) as e:  # ValueError: FewShotFormat's sampler check
            raise TaskError(f"task {p.stem}: {e}") from None
        name = settings.task or p.stem
        if not settings.test:
            raise TaskError(f"task {name}: {path} names no 'test' file of items")
        kind, items, _ = read_items(str(p.parent / settings.test), name)
        pool = None
        if settings.fewshot:
            pool_kind, pool_items, solutions = read_items(str(p.parent / settings.fewshot), name)
            if pool_kind != kind:
                raise TaskError(f"task {name}: few-shot file holds {pool_kind} items, the test file {kind}")
            pool = tuple(examples_of(kind, pool_items, solutions, name))
        return Task(name, kind, tuple(items), settings, pool, path)
    if p.suffix != ".jsonl":
        raise TaskError(f"task file {path}: expected a .jsonl or .yaml file")
    kind, items, _ = read_items(path, p.stem)
    return Task(p.stem, kind, tuple(items), TaskSettings(), None, path)


# ---------------------------------------------------------------------------------------- prompting

def build_prompts(task: Task, num_fewshot: int | None = None, seed: int = DEFAULT_SEED,
                  limit: int | None = None) -> list[str]:
    """The prompt text of each of the first `limit` items, few-shot examples in front (multiple choice:
    the shared context). A task without a few-shot pool draws from all its items, never the item itself
    (nor, with `shots_exclude_item`, from its pool)."""
    k = task.settings.num_fewshot if num_fewshot is None else num_fewshot
    fmt = task.fewshot_format
    texts = [_item_text(task, item) for item in task.items[:limit]]
    if not k:
        return [fmt.description + t for t in texts]
    own = task.pool is None
    if own and task.kind == "code":
        raise TaskError(f"task {task.name}: few-shot code prompts need a few-shot file with solutions")
    pool = examples_of(task.kind, task.items) if own else task.pool
    exclude = own or task.shots_exclude_item
    items = examples_of(task.kind, task.items[:len(texts)]) if exclude else [None] * len(texts)
    _check_pool(task.name, k, pool, items if exclude else None, own=own)
    shots = draw_shots(items, k, fmt, pool, own=exclude, seed=seed)
    return [fmt.render(s, t) for s, t in zip(shots, texts)]


def _check_pool(task: str, k: int, pool: Sequence[Example], excluded: Sequence[Example] | None, *,
                own: bool) -> None:
    """Refuse K larger than the examples available to every item. Where each item is excluded from its
    shots (`excluded`: the items as examples), its examples are those that differ from it (every copy
    is left out, as lm-eval does) and one more is drawn first: one fewer than the pool, or fewer still
    where items repeat."""
    if excluded is None:
        available, where = len(pool), "its few-shot examples"
    else:
        copies = collections.Counter(pool)
        fewest = max(excluded, key=lambda x: copies[x])
        available = len(pool) - max(1, copies[fewest])
        where = f"the examples that differ from {fewest.text[:40]!r}" if copies[fewest] > 1 else (
            "its other items" if own else "its few-shot examples, less one")
    if k > available:
        raise TaskError(f"task {task}: --num-fewshot {k} is larger than the example pool ({available} in {where})")


def _item_text(task: Task, item) -> str:
    if task.kind == "multiple_choice":
        if len(set(item.contexts)) != 1:
            raise TaskError(f"task {task.name}: item {item.id}: few-shot prompts need one shared context")
        return item.contexts[0]
    return item.context if task.kind == "generate" else item.prompt


def with_prompts(task: Task, prompts: Sequence[str]) -> tuple:
    """The task's items with their prompt replaced by `prompts` (few-shot examples in front)."""
    if task.kind == "multiple_choice":
        return tuple(Item(i.id, (p,) * len(i.contexts), i.continuations, i.label) for i, p in zip(task.items, prompts))
    if task.kind == "generate":
        return tuple(dataclasses.replace(i, context=p) for i, p in zip(task.items, prompts))
    return task.items

