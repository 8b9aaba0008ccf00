"""Task accuracy during training (`eval_tasks`): it never changes the losses, and what it logs is what
`eval.py tasks` computes on the saved checkpoint of that step.

Oracles: a run without eval_tasks (losses equal bitwise, fp32 on CPU); a TaskRunner on the final
checkpoint read back from disk by the evaluation loader (metrics equal to 1e-12).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_train import _no_compile, compilation_cache, losses_from_jsonl, prepare, run_in_process  # noqa: F401

MC_ITEMS = [("the cat sees the", ["dog", "owl"], 0), ("the fox likes the", ["cow", "bee"], 1),
            ("the yak greets the", ["elk", "cat"], 0), ("the owl feeds the", ["fox", "dog"], 1)]
GEN_ITEMS = [("the cat sees the", ["dog"]), ("the elk chases the", ["owl", "cow"])]


def write_tasks(directory: Path) -> list[str]:
    """A multiple-choice JSONL task and a generative YAML task (4 new tokens), short enough for the tiny
    model's 32-token context."""
    directory.mkdir(parents=True, exist_ok=True)
    mc = directory / "animals.jsonl"
    mc.write_text("".join(json.dumps({"context": c, "choices": ch, "label": label}) + "\n" for c, ch, label in MC_ITEMS))
    (directory / "gen_items.jsonl").write_text("".join(
        json.dumps({"type": "generate", "context": c, "answers": a}) + "\n" for c, a in GEN_ITEMS))
    gen = directory / "next_animal.yaml"
    gen.write_text("test: gen_items.jsonl\nuntil: ['.']\nmax_new_tokens: 4\n")
    return [str(mc), str(gen)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("train_corpus"))


def test_task_eval_logs_metrics_and_leaves_the_losses_unchanged(corpus, tmp_path, capsys):
    from llama_jax.evaluation.loading import load_eval_model
    from llama_jax.evaluation.runner import RunOptions, TaskRunner, prepare as prepare_task
    from llama_jax.evaluation.catalog import load_tasks

    files = write_tasks(tmp_path / "tasks")
    plain = run_in_process(corpus, tmp_path / "plain", steps=6)
    tasks = f"{{tasks: [{', '.join(files)}], batch_size: 4}}"
    with_tasks = run_in_process(corpus, tmp_path / "tasks_run", steps=6, eval_tasks=tasks, task_eval_every=3)
    assert with_tasks.losses == plain.losses  # exact equality of fp32 values
    assert losses_from_jsonl(tmp_path / "tasks_run") == losses_from_jsonl(tmp_path / "plain")

    records = [json.loads(line) for line in (tmp_path / "tasks_run" / "metrics.jsonl").read_text().splitlines()]
    by_kind = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    assert [r["step"] for r in by_kind["eval/animals"]] == [3, 6]
    assert [r["step"] for r in by_kind["eval/next_animal"]] == [3, 6]
    assert not any(r["kind"].startswith("eval/") for r in
                   (json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()))
    events = b"".join(p.read_bytes() for p in (tmp_path / "tasks_run" / "tensorboard").glob("events.out.tfevents.*"))
    for tag in (b"eval/animals/acc", b"eval/animals/acc_norm", b"eval/next_animal/exact_match"):
        assert tag in events, tag
    out = capsys.readouterr().out
    assert "step 3 eval/animals | acc " in out and "step 6 eval/next_animal | exact_match " in out

    # oracle: the same tasks scored by the evaluation path on the step-6 checkpoint read back from disk
    model = load_eval_model(str(tmp_path / "tasks_run"), dtype="fp32", tokenizer_path=corpus["tokenizer"])
    options = RunOptions(batch_size=4)
    runner = TaskRunner(model, options)
    for task in load_tasks(files):
        expected, _ = runner.run(prepare_task(task, options))
        logged = {k: v for k, v in by_kind[f"eval/{task.name}"][-1].items() if k not in ("step", "kind", "time")}
        assert logged == pytest.approx(expected, rel=1e-12, abs=1e-12), task.name


@pytest.mark.parametrize("section, message", [
    ("{tasks: [no_such_task]}", r"eval_tasks: unknown task 'no_such_task'"),
    ("{tasks: [MISSING/x.jsonl]}", r"eval_tasks: task x: file .*x.jsonl does not exist"),
    ("{tasks: [TASKS/animals.jsonl], num_fewshot: 4}", r"eval_tasks: .*animals"),
    ("{tasks: [TASKS/animals.jsonl], limit: 0}", r"eval_tasks.limit must be >= 1"),
    ("{tasks: []}", r"task_eval_every=2 but eval_tasks.tasks names no task"),
])
def test_bad_eval_tasks_fail_before_compiling(corpus, tmp_path, monkeypatch, section, message):
    from llama_jax.utils.config_io import ConfigError

    write_tasks(tmp_path / "tasks")
    _no_compile(monkeypatch)
    section = section.replace("TASKS", str(tmp_path / "tasks")).replace("MISSING", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=message):
        run_in_process(corpus, tmp_path / "run", eval_tasks=section, task_eval_every=2)


def test_code_tasks_in_training_run_unsandboxed_only_with_consent(monkeypatch):
    """Where bubblewrap cannot run, a code task in `eval_tasks` is refused before anything compiles, with
    the training key that consents; given it, the task's programs run with the audit hook alone."""
    from llama_jax.evaluation import sandbox
    from llama_jax.training.config import load_train_config
    from llama_jax.training.task_eval import TaskEval
    from llama_jax.utils.config_io import ConfigError

    monkeypatch.setattr(sandbox, "find_isolation", lambda: "bwrap is not installed")
    section = "eval_tasks={tasks: [humaneval], limit: 1}"
    with pytest.raises(ConfigError, match=r"^eval_tasks: code tasks run generated programs only in a container, "
                                          r"and bwrap is not installed: .*eval_tasks.unsafe_run_generated_code=true"):
        TaskEval.prepare(load_train_config(None, [section]))
    consented = TaskEval.prepare(load_train_config(None, [section, "eval_tasks.unsafe_run_generated_code=true"]))
    assert consented._options.allow_unsafe_code
    assert sandbox.choose_isolation(consented._options.allow_unsafe_code) == sandbox.Isolation(bwrap=False)
