"""Few-shot prompts laid out and drawn as lm-evaluation-harness draws them, byte for byte.

An example is a (text, target) pair: the question as prompted and its answer. A K-shot prompt is

    description + (text_1 + target_delimiter + target_1 + fewshot_delimiter) * K + text

(defaults: target delimiter " ", few-shot delimiter "\\n\\n"). Examples come from a separate pool (a
train/dev split or file) or, when a task has none, from its own items, never the item itself.

Drawing follows lm-evaluation-harness's samplers so the same task, seed and K give the same prompts:
one `random.Random(seed)` per task, consumed item after item in order; "random" draws `rnd.sample(pool,
K)` from a separate pool, and from the task's own items `rnd.sample(pool, K + 1)` with every copy of
the item removed, keeping the first K (drawing again from the pool without the item when that leaves
fewer); "first_n" takes the first K examples (MMLU's fixed dev-set shots).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

SAMPLERS = ("random", "first_n")
DEFAULT_SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed


@dataclass(frozen=True)
class Example:
    text: str
    target: str


@dataclass(frozen=True)
class FewShotFormat:
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    sampler: str = "random"

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {list(SAMPLERS)}")

    def render(self, shots: Sequence[Example], text: str) -> str:
        body = "".join(s.text + self.target_delimiter + s.target + self.fewshot_delimiter for s in shots)
        return self.description + body + text


def check_pool(task: str, k: int, pool_size: int, *, own_items: bool) -> None:
    """Refuse K larger than the examples available to every item (one fewer from a task's own items)."""
    available = pool_size - 1 if own_items else pool_size
    if k > available:
        where = "its other items" if own_items else "its few-shot examples"
        raise ValueError(f"task {task}: --num-fewshot {k} is larger than the example pool ({available} in {where})")


def draw_shots(items: Sequence[Example | None], k: int, fmt: FewShotFormat, pool: Sequence[Example], *,
               own: bool, seed: int = DEFAULT_SEED) -> list[list[Example]]:
    """The K examples of each of `items`, in order. `own`: the pool is the task's own items (each item
    excluded from its own shots); otherwise the items' values do not matter, only their number."""
    if k == 0:
        return [[] for _ in items]
    pool = list(pool)
    rnd = random.Random(seed)
    shots = []
    for item in items:
        if fmt.sampler == "first_n":
            shots.append([x for x in pool if not own or x != item][:k])
        elif not own:
            shots.append(rnd.sample(pool, k))
        else:
            drawn = [x for x in rnd.sample(pool, k + 1) if x != item][:k]
            if len(drawn) < k:
                drawn = rnd.sample([x for x in pool if x != item], k)
            shots.append(drawn)
    return shots
