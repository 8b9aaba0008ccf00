"""Zero-shot multiple choice, scored as lm-evaluation-harness scores it.

An item is a question with N choices; choice i is the pair (context_i, continuation_i). Usually the
context is shared and continuation_i = " " + choice_i (the target delimiter is one space and the
context carries no trailing space); Winogrande instead varies the context and shares the continuation
(lm-evaluation-harness's "partial evaluation").

Encoding (lm-evaluation-harness's `_encode_pair`): trailing whitespace of the context is moved to the
front of the continuation; whole = encode(context + continuation) and ctx = encode(context), both with
BOS when `bos` is on (by default: when the tokenizer's convention says, `Tokenizer.adds_bos`); the continuation tokens are whole[len(ctx):]. When the tokenizer merges a token
across the boundary, that token counts as continuation, and the context keeps only len(ctx) tokens of
whole's. An empty context is the BOS token alone. Sequences longer than the model's context lose
tokens from the left. A choice's score is the sum of log p over its continuation tokens.

Metrics: acc = share of items whose highest-scoring choice is the label; acc_norm the same after
dividing each score by the UTF-8 byte length of its continuation text without the delimiter space
(lm-evaluation-harness divides by len(choice) in characters: equal for ASCII); each with its standard
error, sample standard deviation / sqrt(n). Ties go to the first choice (numpy's argmax).

Local task files are read by `suite` (JSONL, one item per line); TFDS tasks (`TFDS_TASKS`) are read
from a prepared `data_dir` and never downloaded; their prompts are lm-evaluation-harness's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from llama_jax.evaluation.scoring import TokenScorer


@dataclass(frozen=True)
class Item:
    """One question: per choice a (context, continuation) pair; `label` is the correct choice's index."""

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int

    def __post_init__(self):
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise ValueError(f"item {self.id}: needs >= 2 choices, each with a context and a continuation")
        if not 0 <= self.label < len(self.contexts):
            raise ValueError(f"item {self.id}: label {self.label} is not a choice index in [0, {len(self.contexts)})")


def shared_context_item(item_id: str, context: str, choices: Sequence[str], label: int) -> Item:
    """The usual item: one context, continuation " " + choice."""
    return Item(str(item_id), (context,) * len(choices), tuple(" " + c for c in choices), int(label))


# ----------------------------------------------------------------------------------------------- TFDS

def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing (WikiHow markup removed)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def piqa_item(i: int, r: dict) -> Item:
    return shared_context_item(_text(r.get("id", i)), f"Question: {_text(r['goal'])}\nAnswer:",
                               [_text(r["sol1"]), _text(r["sol2"])], int(r["label"]))


def hellaswag_item(i: int, r: dict) -> Item:
    # TFDS keeps only the joined `ctx`; lm-evaluation-harness capitalises the first letter of ctx_b.
    context = _hellaswag_clean(f"{_text(r['activity_label'])}: {_text(r['context'])}")
    return shared_context_item(_text(r.get("source_id", i)) + f"#{i}", context,
                               [_hellaswag_clean(_text(e)) for e in r["endings"]], int(r["label"]))


def winogrande_item(i: int, r: dict) -> Item:
    """Partial evaluation: context = sentence up to the blank with the option filled in; the rest is
    the shared continuation."""
    sentence = _text(r["sentence"])
    blank = sentence.index("_")
    continuation = " " + sentence[blank + 1:].strip()
    options = [_text(r["option1"]), _text(r["option2"])]
    return Item(str(i), tuple(sentence[:blank] + o for o in options), (continuation,) * 2, int(r["label"]))


def arc_item(i: int, r: dict) -> Item:
    labels = [_text(x) if not isinstance(x, (int, np.integer)) else "ABCDE"[int(x)] for x in r["choices"]["label"]]
    answer = r["answerKey"]
    answer = "ABCDE"[int(answer)] if isinstance(answer, (int, np.integer)) else _text(answer)
    return shared_context_item(_text(r.get("id", i)), f"Question: {_text(r['question'])}\nAnswer:",
                               [_text(t) for t in r["choices"]["text"]], labels.index(answer))


def openbookqa_item(i: int, r: dict) -> Item:
    q = r["question"]
    return shared_context_item(str(i), _text(q["stem"]), [_text(q[f"choice_{k}"]) for k in "ABCD"],
                               int(r["answerKey"]))


def boolq_item(i: int, r: dict) -> Item:
    context = f"{_text(r['passage'])}\nQuestion: {_text(r['question'])}?\nAnswer:"
    return shared_context_item(str(i), context, ["no", "yes"], int(bool(r["answer"])))


@dataclass(frozen=True)
class TfdsTask:
    dataset: str  # TFDS name, with "/config" where the dataset has configs
    split: str  # the split lm-evaluation-harness reports
    to_item: Callable[[int, dict], Item]
    module: str = ""  # catalog module to import first: `tensorflow_datasets.text` is not imported by default


TFDS_TASKS = {
    "piqa": TfdsTask("piqa", "validation", piqa_item),
    "hellaswag": TfdsTask("hellaswag", "validation", hellaswag_item, "tensorflow_datasets.text.hellaswag"),
    "winogrande": TfdsTask("winogrande", "validation", winogrande_item, "tensorflow_datasets.text.winogrande"),
    "arc_easy": TfdsTask("ai2_arc/ARC-Easy", "test", arc_item),
    "arc_challenge": TfdsTask("ai2_arc/ARC-Challenge", "test", arc_item),
    "openbookqa": TfdsTask("openbookqa", "test", openbookqa_item),
    "boolq": TfdsTask("bool_q", "validation", boolq_item),
}


def load_tfds_task(name: str, *, data_dir: str | None, split: str | None = None) -> list[Item]:
    """Items of a catalog task from its dataset prepared (array_record) in `data_dir`; never downloads."""
    import importlib

    from llama_jax.data.tfds_source import open_prepared_split

    task = TFDS_TASKS[name]
    if task.module:
        importlib.import_module(task.module)
    try:
        _, records = open_prepared_split(task.dataset, split or task.split, data_dir)
    except ValueError as e:
        raise ValueError(f"task {name}: {e}") from e
    return [task.to_item(i, records[i]) for i in range(len(records))]


# ------------------------------------------------------------------------------------------- scoring

def encode_pair(tokenizer, context: str, continuation: str, *, bos: bool | None = None
                ) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) by lm-evaluation-harness's rule (module docstring)."""
    bos = tokenizer.adds_bos if bos is None else bos
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation, bos=False)
    whole = tokenizer.encode(context + continuation, bos=bos)
    ctx = tokenizer.encode(context, bos=bos)
    return ctx, whole[len(ctx):]


def choice_scores(scorer: TokenScorer, tokenizer, items: Sequence[Item], *, bos: bool | None = None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per item: (log-likelihood of each choice, whether each continuation is the greedy one)."""
    pairs, groups = [], []
    for item in items:
        group = []
        for context, continuation in zip(item.contexts, item.continuations):
            ctx, cont = encode_pair(tokenizer, context, continuation, bos=bos)
            if not cont:
                raise ValueError(f"item {item.id}: continuation {continuation!r} encodes to no tokens")
            if len(cont) >= scorer.max_len:
                raise ValueError(f"item {item.id}: continuation of {len(cont)} tokens does not fit the "
                                 f"maximum length {scorer.max_len}")
            group.append(len(pairs))
            pairs.append((ctx, cont))
        groups.append(group)
    scored = scorer.score_continuations(pairs)
    return [(np.array([scored[s][0].sum() for s in group]), np.array([bool(scored[s][1].all()) for s in group]))
            for group in groups]


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    stderr = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(np.mean(values)), stderr


def predictions(loglikelihoods: np.ndarray, byte_lengths: Sequence[int]) -> tuple[int, int]:
    """(choice with the highest log-likelihood, the same after dividing by byte length)."""
    lls = np.asarray(loglikelihoods, np.float64)
    return int(np.argmax(lls)), int(np.argmax(lls / np.asarray(byte_lengths, np.float64)))


def multiple_choice_metrics(loglikelihoods: Sequence[np.ndarray], byte_lengths: Sequence[Sequence[int]],
                            labels: Sequence[int]) -> dict:
    """acc and acc_norm with their standard errors (module docstring)."""
    if not loglikelihoods:
        raise ValueError("no items to score")
    preds = [predictions(ll, n) for ll, n in zip(loglikelihoods, byte_lengths)]
    acc, acc_stderr = _mean_and_stderr(np.array([p == y for (p, _), y in zip(preds, labels)], np.float64))
    acc_norm, acc_norm_stderr = _mean_and_stderr(np.array([p == y for (_, p), y in zip(preds, labels)], np.float64))
    return {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_stderr,
            "n": len(labels)}


def continuation_bytes(continuation: str) -> int:
    """Length used by acc_norm: UTF-8 bytes of the continuation without the leading delimiter space."""
    return len(continuation.removeprefix(" ").encode("utf-8"))


def evaluate_task(scorer: TokenScorer, tokenizer, items: Sequence[Item], *, bos: bool | None = None
                  ) -> tuple[dict, list[dict]]:
    """(metrics, one record per item for the JSONL report)."""
    scores = choice_scores(scorer, tokenizer, items, bos=bos)
    lengths = [[continuation_bytes(c) for c in item.continuations] for item in items]
    metrics = multiple_choice_metrics([s[0] for s in scores], lengths, [item.label for item in items])
    records = []
    for item, (lls, greedy), n in zip(items, scores, lengths):
        shared = len(set(item.contexts)) == 1
        pred, pred_norm = predictions(lls, n)
        records.append({
            "id": item.id,
            "context": item.contexts[0] if shared else list(item.contexts),
            "choices": list(item.continuations),
            "label": item.label,
            "loglikelihoods": [float(x) for x in lls],
            "is_greedy": [bool(x) for x in greedy],
            "pred": pred, "pred_norm": pred_norm,
            "acc": float(pred == item.label), "acc_norm": float(pred_norm == item.label),
        })
    return metrics, records
