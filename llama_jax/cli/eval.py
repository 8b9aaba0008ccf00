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
The model runs on a mesh over all devices of all processes (--fsdp/--tensor/--strategy); results are
printed as JSON by process 0. Generated code runs only in a bubblewrap container (docs/evaluation.md);
where bwrap cannot run, code tasks are refused unless --unsafe-run-generated-code.
Exit status: 0 done, 2 bad input or configuration.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama_jax.cli.flags import add_flag, run_program


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run dir, params dir, Meta or Hugging Face checkpoint directory")
    parser.add_argument("--format", choices=("meta", "hf", "orbax"), default=None, help="default: detected")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default: the checkpoint's own)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute and weight dtype")
    bos = parser.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_const", const=True, default=None,
                     help="put BOS in front of each text (default: as the tokenizer's own convention says)")
    add_flag(bos, "--no-bos", dest="bos", action="store_const", const=False, default=None,
             help="do not put BOS in front of each text")
    add_flag(parser, "--data-parallel", type=int, default=1, help="mesh 'data' axis size")
    parser.add_argument("--fsdp", type=int, default=-1, help="mesh 'fsdp' axis size (-1: remaining devices)")
    parser.add_argument("--tensor", type=int, default=1, help="mesh 'tensor' axis size")
    parser.add_argument("--strategy", default="fsdp", help="sharding rules: dp, fsdp or fsdp+tp")
    parser.add_argument("--distributed", default="auto", choices=("auto", "on", "off"),
                        help="join a multi-host job (auto: when the environment says so)")
    add_flag(parser, "--coordinator-address", default=None)
    add_flag(parser, "--num-processes", type=int, default=None)
    add_flag(parser, "--process-id", type=int, default=None)


def _unsafe_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--unsafe-run-generated-code", action="store_true",
                        help=f"consent to running model-written code for {what}")


def _code_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--code-timeout", type=float, default=10.0, help="seconds per generated program")
    add_flag(parser, "--code-workers", type=int, default=0, help="programs run at once (default: CPU count)")
    _unsafe_flag(parser, "code tasks where bubblewrap cannot run (audit hook only, no container)")


def _parser() -> argparse.ArgumentParser:
    description, details = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="llama-jax-eval", description=description, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    ppl = sub.add_parser("perplexity", help="mean NLL, perplexity and bits per byte of documents")
    _common(ppl)
    ppl.add_argument("--data", action="append", required=True, help="documents (repeatable; see above)")
    add_flag(ppl, "--text-field", default="text", help="JSONL / TFDS field holding the text")
    ppl.add_argument("--split", default="validation", help="TFDS split")
    add_flag(ppl, "--data-dir", default="", help="TFDS data_dir holding the prepared dataset")
    add_flag(ppl, "--context-len", type=int, default=None, help="window length (default: max_seq_len)")
    ppl.add_argument("--stride", type=int, default=None, help="classic strided windows beginning every STRIDE "
                     "tokens (default: lm-evaluation-harness's rolling windows)")
    add_flag(ppl, "--batch-size", type=int, default=8)
    ppl.add_argument("--output", default=None, help="also write the results to this JSON file")

    tasks = sub.add_parser("tasks", help="multiple choice, generative and code tasks, zero- or few-shot")
    _common(tasks)
    tasks.add_argument("--tasks", required=True, help="comma-separated catalog names and/or .jsonl/.yaml task files")
    add_flag(tasks, "--data-dir", default=None, help="TFDS data_dir holding the prepared datasets")
    tasks.add_argument("--split", default=None, help="split for every TFDS task (default: each task's own)")
    tasks.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    add_flag(tasks, "--batch-size", type=int, default=16)
    add_flag(tasks, "--max-len", type=int, default=None, help="longest sequence (default: max_seq_len)")
    add_flag(tasks, "--output-dir", default=None, help="write results.json and TASK.jsonl (per item) here")
    add_flag(tasks, "--num-fewshot", type=int, default=None, help="examples in front of each item (default: "
             "each task's own, 0 for files)")
    add_flag(tasks, "--fewshot-seed", type=int, default=1234, help="seed of the few-shot draw (lm-eval's default)")
    tasks.add_argument("--samples", type=int, default=1, help="completions per generative/code item (maj@k, pass@k)")
    tasks.add_argument("--temperature", type=float, default=0.0, help="0: greedy (needs --samples 1)")
    add_flag(tasks, "--top-k", type=int, default=0, help="0: off")
    add_flag(tasks, "--top-p", type=float, default=1.0, help="1: off")
    tasks.add_argument("--seed", type=int, default=0, help="sampling seed of the first sample (then +1 each)")
    add_flag(tasks, "--max-new-tokens", type=int, default=None, help="generation length (default: each task's)")
    _code_flags(tasks)

    score = sub.add_parser("score-code", help="pass@k of saved completions (TASK.jsonl of `tasks --output-dir`)")
    score.add_argument("task", help="a code task: humaneval, mbpp or a task file")
    score.add_argument("--completions", required=True, help="JSONL, one {\"id\", \"completions\": [...]} per line")
    add_flag(score, "--data-dir", default=None, help="directory holding mbpp/ (for mbpp)")
    score.add_argument("--output", default=None, help="also write the results to this JSON file")
    _code_flags(score)

    harness = sub.add_parser("harness", help="lm-evaluation-harness tasks with llama_jax as the model")
    _common(harness)
    harness.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    add_flag(harness, "--include-path", default=None, help="directory of extra lm-eval task YAMLs")
    add_flag(harness, "--num-fewshot", type=int, default=None, help="default: each task's own")
    harness.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    add_flag(harness, "--output-dir", default=None, help="write results.json and samples_TASK.jsonl here")
    add_flag(harness, "--batch-size", type=int, default=16)
    add_flag(harness, "--max-gen-toks", type=int, default=256, help="generation length unless a task sets it")
    add_flag(harness, "--fewshot-seed", type=int, default=1234)
    harness.add_argument("--seed", type=int, default=0, help="sampling seed of the first repeat")
    _unsafe_flag(harness, "lm-eval's code tasks (lm-eval runs their programs itself, in-process, with no sandbox)")

    gen = sub.add_parser("generate", help="sample text with a KV cache")
    _common(gen)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: one batch)")
    add_flag(gen, "--prompt-file", default=None, help="a file of prompts, one per line")
    add_flag(gen, "--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    add_flag(gen, "--top-k", type=int, default=0, help="0: off")
    add_flag(gen, "--top-p", type=float, default=1.0, help="1: off")
    gen.add_argument("--seed", type=int, default=0)
    add_flag(gen, "--ignore-eos", action="store_true", help="always generate max_new_tokens")
    from llama_jax.data.chat_template import TEMPLATE_CHOICES

    gen.add_argument("--chat", choices=TEMPLATE_CHOICES, default=None,
                     help="each prompt is a user turn in this chat template (as in fine-tuning); stops at its "
                          "end-of-turn token")
    gen.add_argument("--system", default="", help="with --chat: a system prompt before each prompt")
    add_flag(gen, "--chat-date", default=None,
             help="with --chat: the date the template writes (LLaMA 3.1's 'Today Date'; default: the template's)")
    return parser


def _source(spec: str, args):
    from llama_jax.data.config import SourceConfig

    if spec.startswith("tfds:"):
        return SourceConfig(kind="tfds", name=spec[5:], split=args.split, data_dir=args.data_dir,
                            text_field=args.text_field)
    if spec.startswith("builtin:"):
        return SourceConfig(kind="builtin", split=spec[8:])
    kind = "jsonl" if spec.endswith(".jsonl") else "text"
    return SourceConfig(kind=kind, path=spec, text_field=args.text_field)


def _read_texts(args) -> list[str]:
    from llama_jax.data.sources import read_documents

    return [doc for spec in args.data for doc in read_documents(_source(spec, args))]


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("generate: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _load(args):
    from llama_jax.parallel.distributed import DistributedConfig, initialize
    from llama_jax.evaluation.loading import load_eval_model
    from llama_jax.parallel.mesh import MeshConfig

    initialize(DistributedConfig(mode=args.distributed, coordinator_address=args.coordinator_address,
                                 num_processes=args.num_processes, process_id=args.process_id))
    mesh_cfg = MeshConfig(data=args.data_parallel, fsdp=args.fsdp, tensor=args.tensor, strategy=args.strategy)
    return load_eval_model(args.checkpoint, dtype=args.dtype, mesh_cfg=mesh_cfg, tokenizer_path=args.tokenizer,
                           fmt=args.format)


def check_window_flags(context_len: int | None, stride: int | None, batch_size: int) -> None:
    """--context-len, --stride and --batch-size as the window schemes need them, before anything is read
    (0 is not "the default": it is refused like any other impossible value)."""
    for flag, value, least in (("--context-len", context_len, 2), ("--stride", stride, 1), ("--batch-size", batch_size, 1)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if stride is not None and context_len is not None and stride >= context_len:
        raise ValueError(f"--stride must be below --context-len ({context_len}), got {stride}")


def run_perplexity(args, emit) -> None:
    from llama_jax.evaluation.perplexity import evaluate_perplexity
    from llama_jax.evaluation.scoring import TokenScorer

    check_window_flags(args.context_len, args.stride, args.batch_size)
    texts = _read_texts(args)  # bad data fails before the checkpoint is read
    model = _load(args)
    context_len = model.cfg.max_seq_len if args.context_len is None else args.context_len
    scorer = TokenScorer(model, batch_size=args.batch_size, max_len=context_len)
    result = evaluate_perplexity(scorer, texts, model.tokenizer, context_len=context_len, stride=args.stride,
                                 bos=args.bos).as_dict()
    result.update(context_len=context_len, windows="rolling" if args.stride is None else f"stride {args.stride}")
    emit(result, args.output)


def _code_limits(args):
    from llama_jax.evaluation.sandbox import Limits

    return Limits(timeout_s=args.code_timeout, cpu_s=max(1, int(args.code_timeout)))


def run_tasks(args, emit) -> None:
    from llama_jax.evaluation.runner import RunOptions, TaskRunner, prepare
    from llama_jax.evaluation.catalog import load_tasks

    options = RunOptions(num_fewshot=args.num_fewshot, fewshot_seed=args.fewshot_seed, limit=args.limit,
                         samples=args.samples, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         bos=args.bos,
                         code_limits=_code_limits(args), code_workers=args.code_workers,
                         allow_unsafe_code=args.unsafe_run_generated_code)
    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    prepared = [prepare(t, options) for t in load_tasks(specs, data_dir=args.data_dir, split=args.split)]
    model = _load(args)  # every task, prompt and item was checked above
    runner = TaskRunner(model, options, max_len=args.max_len)
    results, out_dir = {}, Path(args.output_dir) if args.output_dir else None
    for p in prepared:
        metrics, records = runner.run(p)
        results[p.task.name] = metrics
        if out_dir is not None and emit.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            (out_dir / f"{p.task.name}.jsonl").write_text(lines, encoding="utf-8")
    emit(results, str(out_dir / "results.json") if out_dir else None)


def run_score_code(args, emit) -> None:
    from llama_jax.evaluation.catalog import load_tasks
    from llama_jax.evaluation.code_exec import code_metrics, execute, read_completions
    from llama_jax.evaluation.runner import PASS_KS
    from llama_jax.evaluation.sandbox import choose_isolation

    (task,) = load_tasks([args.task], data_dir=args.data_dir)
    if task.kind != "code":
        raise ValueError(f"score-code: task {task.name} is a {task.kind} task, not a code task")
    items, completions = read_completions(args.completions, task.items)
    choose_isolation(args.unsafe_run_generated_code)
    outcomes = execute(items, completions, _code_limits(args), workers=args.code_workers,
                       allow_unsafe=args.unsafe_run_generated_code)
    emit({task.name: code_metrics(outcomes, [k for k in PASS_KS if k <= min(map(len, completions))])}, args.output)


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


def run_harness(args, emit) -> None:
    from llama_jax.utils.extras import require

    require("eval", "eval.py harness", ("lm_eval",))
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from llama_jax.evaluation.harness import lm_class

    names = [s.strip() for s in args.tasks.split(",") if s.strip()]
    manager = _task_manager(names, args.include_path)
    lm = lm_class()(model=_load(args), batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, seed=args.seed,
                    add_bos_token=args.bos)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=manager, log_samples=bool(args.output_dir),
                                      fewshot_random_seed=args.fewshot_seed,
                                      confirm_run_unsafe_code=args.unsafe_run_generated_code)
    except ValueError as e:
        if "marked as unsafe" not in str(e):
            raise
        raise ValueError(f"{str(e).split('. Set confirm_run_unsafe_code')[0]}: lm-eval runs its generated code "
                         "in-process, without a sandbox; pass --unsafe-run-generated-code to allow it") from None
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None and emit.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for task, samples in out.pop("samples", {}).items():
            lines = "".join(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n" for s in samples)
            (out_dir / f"samples_{task}.jsonl").write_text(lines, encoding="utf-8")
    emit(json.loads(json.dumps({"results": out["results"], "n-samples": out.get("n-samples", {})},
                               default=handle_non_serializable)), str(out_dir / "results.json") if out_dir else None)


def run_generate(args, emit) -> None:
    from llama_jax.evaluation.generate import Generator, SamplingConfig

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop_at_eos=not args.ignore_eos)
    prompts = _prompts(args)
    model = _load(args)
    tok = model.tokenizer
    if args.chat:
        from llama_jax.evaluation.generate import chat_prompts

        head = [{"role": "system", "content": args.system}] if args.system else []
        token_prompts, end_of_turn = chat_prompts(tok, args.chat, [head + [{"role": "user", "content": p}]
                                                                   for p in prompts], date=args.chat_date)
        result = Generator(model, sampling, eos_id=end_of_turn)(token_prompts)
    else:
        bos = tok.adds_bos if args.bos is None else args.bos
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


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from llama_jax.utils.config_io import ConfigError

    run = {"perplexity": run_perplexity, "tasks": run_tasks, "score-code": run_score_code, "harness": run_harness,
           "generate": run_generate}[args.command]
    try:
        run(args, _Emitter())
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> int:
    """The `llama-jax-eval` console script and `python eval.py`."""
    return run_program(main)
