"""Evaluate a LLaMA checkpoint: perplexity, zero-shot multiple-choice tasks, text generation.
(`llama-jax-eval` and `python eval.py` are the same program.)

    llama-jax-eval perplexity CHECKPOINT --data FILE_DIR_OR_GLOB [--data more.jsonl] [--stride 1024]
    llama-jax-eval tasks CHECKPOINT --tasks piqa,gsm8k,humaneval,my_task.yaml --data-dir ~/tensorflow_datasets
    llama-jax-eval score-code humaneval --completions out/humaneval.jsonl   (rescore saved completions, no model)
    llama-jax-eval harness CHECKPOINT --tasks gsm8k --include-path my_tasks/ --num-fewshot 5 --limit 50
    llama-jax-eval generate CHECKPOINT --prompt "The capital of France is" [--temperature 0.8 --top-p 0.9]
    llama-jax-eval generate CHECKPOINT --chat llama3 --system "Be brief." --prompt "Name three rivers."

CHECKPOINT is a llama_jax run directory, a params directory (`convert --to orbax`), or a Meta or Hugging
Face directory (converted in memory, nothing written); its own tokenizer is used unless --tokenizer.
--data: a text file, directory or glob (one file = one document), a .jsonl file (one document per line,
field --text-field), `tfds:NAME` (split --split, prepared in --data-dir) or `builtin:validation`.
The model runs on a mesh over all devices of all processes (--fsdp/--tensor/--strategy: the training
config's mesh section) in --dtype bfloat16 (default) or float32 (or bf16, fp32); results are printed as
JSON by process 0. Every option is also a `key=value` setting, as in training (`batch_size=4 mesh.fsdp=2`).
Generated code runs only in a bubblewrap container (docs/evaluation.md); where bwrap cannot run, code
tasks are refused unless --unsafe-run-generated-code.
Exit status: 0 done, 2 bad input or configuration.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama_jax.cli.flags import run_program
from llama_jax.cli.options import OVERRIDES_HELP, OneLineParser, add_option_flags, parse_command

COMMAND_HELP = {
    "perplexity": "mean NLL, perplexity and bits per byte of documents",
    "tasks": "multiple choice, generative and code tasks, zero- or few-shot",
    "score-code": "pass@k of saved completions (TASK.jsonl of `tasks --output-dir`)",
    "harness": "lm-evaluation-harness tasks with llama_jax as the model",
    "generate": "sample text with a KV cache",
}


def _parser() -> argparse.ArgumentParser:
    from llama_jax.evaluation.options import COMMANDS

    description, details = __doc__.split("\n\n", 1)
    parser = OneLineParser(prog="llama-jax-eval", description=description, epilog=details,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, options in COMMANDS.items():
        add_option_flags(sub.add_parser(command, help=COMMAND_HELP[command], description=COMMAND_HELP[command],
                                        epilog=OVERRIDES_HELP), options)
    return parser


def parse(argv: list[str]):
    """(subcommand, its options dataclass) of a command line; a ConfigError (one line) if it is wrong."""
    from llama_jax.evaluation.options import COMMANDS

    return parse_command(_parser(), argv, COMMANDS)


def _source(spec: str, opts):
    from llama_jax.data.config import SourceConfig

    if spec.startswith("tfds:"):
        return SourceConfig(kind="tfds", name=spec[5:], split=opts.split, data_dir=opts.data_dir,
                            text_field=opts.text_field)
    if spec.startswith("builtin:"):
        return SourceConfig(kind="builtin", split=spec[8:])
    kind = "jsonl" if spec.endswith(".jsonl") else "text"
    return SourceConfig(kind=kind, path=spec, text_field=opts.text_field)


def _read_texts(opts) -> list[str]:
    from llama_jax.data.sources import read_documents

    return [doc for spec in opts.data for doc in read_documents(_source(spec, opts))]


def _prompts(opts) -> list[str]:
    prompts = list(opts.prompt)
    if opts.prompt_file:
        prompts += [line for line in Path(opts.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("generate: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _load(opts):
    from llama_jax.evaluation.loading import load_eval_model
    from llama_jax.parallel.distributed import initialize

    initialize(opts.distributed)
    return load_eval_model(opts.checkpoint, dtype=opts.dtype, mesh_cfg=opts.mesh, tokenizer_path=opts.tokenizer,
                           fmt=opts.format)


def run_perplexity(opts, emit) -> None:
    from llama_jax.evaluation.perplexity import evaluate_perplexity
    from llama_jax.evaluation.scoring import TokenScorer

    texts = _read_texts(opts)  # bad data fails before the checkpoint is read
    model = _load(opts)
    context_len = model.cfg.max_seq_len if opts.context_len is None else opts.context_len
    scorer = TokenScorer(model, batch_size=opts.batch_size, max_len=context_len)
    result = evaluate_perplexity(scorer, texts, model.tokenizer, context_len=context_len, stride=opts.stride,
                                 bos=opts.bos).as_dict()
    result.update(context_len=context_len, windows="rolling" if opts.stride is None else f"stride {opts.stride}")
    emit(result, opts.output)


def run_tasks(opts, emit) -> None:
    from llama_jax.evaluation.runner import TaskRunner, prepare
    from llama_jax.evaluation.catalog import load_tasks

    run_options = opts.run_options()
    specs = [s.strip() for s in opts.tasks.split(",") if s.strip()]
    prepared = [prepare(t, run_options) for t in load_tasks(specs, data_dir=opts.data_dir, split=opts.split)]
    model = _load(opts)  # every task, prompt and item was checked above
    runner = TaskRunner(model, run_options, max_len=opts.max_len)
    results, out_dir = {}, Path(opts.output_dir) if opts.output_dir else None
    for p in prepared:
        metrics, records = runner.run(p)
        results[p.task.name] = metrics
        if out_dir is not None and emit.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            (out_dir / f"{p.task.name}.jsonl").write_text(lines, encoding="utf-8")
    emit(results, str(out_dir / "results.json") if out_dir else None)


def run_score_code(opts, emit) -> None:
    from llama_jax.evaluation.catalog import load_tasks
    from llama_jax.evaluation.code_exec import code_metrics, execute, read_completions
    from llama_jax.evaluation.runner import PASS_KS
    from llama_jax.evaluation.sandbox import choose_isolation

    (task,) = load_tasks([opts.task], data_dir=opts.data_dir)
    if task.kind != "code":
        raise ValueError(f"score-code: task {task.name} is a {task.kind} task, not a code task")
    items, completions = read_completions(opts.completions, task.items)
    choose_isolation(opts.unsafe_run_generated_code)
    outcomes = execute(items, completions, opts.code_limits, workers=opts.code_workers,
                       allow_unsafe=opts.unsafe_run_generated_code)
    emit({task.name: code_metrics(outcomes, [k for k in PASS_KS if k <= min(map(len, completions))])}, opts.output)


def _task_manager(names: list[str], include_path: str | None):
    """lm-eval's TaskManager: only `include_path`'s tasks when they cover `names` (instant), else with
    lm-eval's stock tasks too; unknown names are refused before a model is loaded."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False, include_path=include_path) if include_path else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        from llama_jax.evaluation.harness import unparsable_task_files

        broken = unparsable_task_files(include_path) if include_path else []
        more = f" (and {len(broken) - 1} more unparsable task file{'s' * (len(broken) > 2)})" if len(broken) > 1 else ""
        raise ValueError(f"unknown lm-eval task {unknown[0]!r} (stock tasks"
                         f"{' and ' + include_path if include_path else ''})"
                         + (f"; {broken[0]}{more}" if broken else ""))
    return manager


def run_harness(opts, emit) -> None:
    from llama_jax.utils.extras import require

    require("eval", "eval.py harness", ("lm_eval",))
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from llama_jax.evaluation.harness import lm_class

    names = [s.strip() for s in opts.tasks.split(",") if s.strip()]
    manager = _task_manager(names, opts.include_path)
    lm = lm_class()(model=_load(opts), batch_size=opts.batch_size, max_gen_toks=opts.max_gen_toks, seed=opts.seed,
                    add_bos_token=opts.bos)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=opts.num_fewshot, limit=opts.limit,
                                      task_manager=manager, log_samples=bool(opts.output_dir),
                                      fewshot_random_seed=opts.fewshot_seed,
                                      confirm_run_unsafe_code=opts.unsafe_run_generated_code)
    except ValueError as e:
        if "marked as unsafe" not in str(e):
            raise
        raise ValueError(f"{str(e).split('. Set confirm_run_unsafe_code')[0]}: lm-eval runs its generated code "
                         "in-process, without a sandbox; pass --unsafe-run-generated-code to allow it") from None
    out_dir = Path(opts.output_dir) if opts.output_dir else None
    if out_dir is not None and emit.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for task, samples in out.pop("samples", {}).items():
            lines = "".join(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n" for s in samples)
            (out_dir / f"samples_{task}.jsonl").write_text(lines, encoding="utf-8")
    emit(json.loads(json.dumps({"results": out["results"], "n-samples": out.get("n-samples", {})},
                               default=handle_non_serializable)), str(out_dir / "results.json") if out_dir else None)


def run_generate(opts, emit) -> None:
    from llama_jax.evaluation.generate import Generator

    sampling = opts.sampling()
    prompts = _prompts(opts)
    model = _load(opts)
    tok = model.tokenizer
    if opts.chat:
        from llama_jax.evaluation.generate import chat_prompts

        head = [{"role": "system", "content": opts.system}] if opts.system else []
        token_prompts, end_of_turn = chat_prompts(tok, opts.chat, [head + [{"role": "user", "content": p}]
                                                                   for p in prompts], date=opts.chat_date)
        result = Generator(model, sampling, eos_id=end_of_turn)(token_prompts)
    else:
        bos = tok.adds_bos if opts.bos is None else opts.bos
        result = Generator(model, sampling)([tok.encode(p, bos=bos) for p in prompts])
    emit({"generations": [{"prompt": p, "completion": tok.decode(t), "new_tokens": len(t)}
                          for p, t in zip(prompts, result.tokens)],
          "new_tokens": result.new_tokens, "seconds": result.seconds, "compile_seconds": result.compile_seconds,
          "tokens_per_second": result.tokens_per_second}, None)


class _Emitter:
    """Prints (and writes) results on process 0 only."""

    @property
    def main(self) -> bool:
        from llama_jax.parallel.distributed import is_main_process

        return is_main_process()

    def __call__(self, result: dict, path: str | None) -> None:
        if not self.main:
            return
        text = json.dumps(result, indent=2, ensure_ascii=False)
        print(text)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n", encoding="utf-8")


RUNS = {"perplexity": run_perplexity, "tasks": run_tasks, "score-code": run_score_code, "harness": run_harness,
        "generate": run_generate}


def main(argv: list[str]) -> int:
    from llama_jax.utils.config_io import ConfigError

    try:
        command, options = parse(argv)
        RUNS[command](options, _Emitter())
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> int:
    """The `llama-jax-eval` console script and `python eval.py`."""
    return run_program(main)
