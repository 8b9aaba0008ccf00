"""Task scoring speed: llama_jax's lm-eval backend against lm-eval's own HF backend (HFLM) on the CPU.

Both backends read the same Hugging Face directory (a random LLaMA of the training benchmark's config S
= `tiny`, fp32, with the built-in corpus' SentencePiece tokenizer, BOS added) and answer the same
requests, built once by lm-eval from two local task YAMLs:

- multiple choice: `--mc-items` (256) HellaSwag-shaped items, a 60-130-token context and 4 endings of
  8-30 tokens each (`loglikelihood`, 4 requests per item);
- generative: `--gen-items` (64) prompts of 20-120 tokens, greedy, 64 new tokens (`generate_until` with a
  stop string the model never writes, so every item decodes all 64 unless it emits EOS).

The backends alternate within one run (`--repeats` timed rounds each, after one untimed warm-up round
that also compiles llama_jax's programs); both use `--batch-size` rows. Items/s counts the task's items
(not requests). The ratio is of the best rounds (on a shared 2-core machine the best round is the one
least disturbed by other processes); medians are printed too. A check line compares the answers:
log-likelihoods (fp32 both) and greedy texts. One line per task:

    ratio multiple_choice: llama_jax 52.1 items/s, lm-eval HF 20.3 items/s -> 2.57x (medians ...)

Memory: each backend then runs each job once more in a child process of its own (only its own
imports: jax for llama_jax, torch for HF), which reports its peak RSS (VmHWM): the multiple-choice and
generative requests, and `rolling`, one document of the model's full max_length (`--max-length`
tokens, 8,192 by default as SmolLM2's, the checkpoint's max_position_embeddings) scored as
`loglikelihood_rolling`. One line per job, the target being ours <= 1.5x:

    rss rolling: llama_jax 1.21 GB, lm-eval HF 1.05 GB -> 1.15x (12.3 s / 9.8 s)

The machine's load before and after and the verdict (quiet, or loaded: ratio not valid) come last
(`bench/quiet.py`); only quiet runs' ratios count.

    python bench/eval.py [--mc-items 256] [--gen-items 64] [--repeats 3] [--batch-size 16]
                         [--max-length 8192] [--tasks mc,gen,rss]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from llama_jax.utils.host_memory import tune_host_allocator  # noqa: E402
from convert import peak_rss  # noqa: E402  (VmHWM)
from quiet import monitor  # noqa: E402

NEW_TOKENS = 64
NEVER = "<never written>"
WORDS = ("the a of and to in is was for on that with as by at from it this be are or an which one all "
         "people city water river house village morning evening year man woman child road king market "
         "walked built found opened carried watched turned began asked gave wrote sold kept found moved "
         "quickly slowly before after under over between during across without along near far").split()


def words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n)).capitalize()


def task_files(root: Path, mc_items: int, gen_items: int, seed: int = 0) -> None:
    """Local data and lm-eval task YAMLs `bench_mc` and `bench_gen` under `root`."""
    rng = np.random.default_rng(seed)
    mc = [{"context": words(rng, int(rng.integers(30, 70))) + ".",
           "choices": [words(rng, int(rng.integers(4, 15))) + "." for _ in range(4)], "label": int(rng.integers(4))}
          for _ in range(mc_items)]
    gen = [{"context": "Question: " + words(rng, int(rng.integers(8, 55))) + "?\nAnswer:", "answer": "x"}
           for _ in range(gen_items)]
    for name, rows in (("mc", mc), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{context}}'\n"
    (root / "bench_mc.yaml").write_text(
        f"task: bench_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n")
    (root / "bench_gen.yaml").write_text(
        f"task: bench_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        f"output_type: generate_until\ndoc_to_target: '{{{{answer}}}}'\n"
        f"generation_kwargs:\n  until: [{json.dumps(NEVER)}]\n  do_sample: false\n  max_gen_toks: {NEW_TOKENS}\n")


def task_requests(root: Path, name: str) -> list:
    """lm-eval's request instances of task `name` (its own prompt building, zero-shot)."""
    from lm_eval.tasks import TaskManager

    with warnings.catch_warnings():  # load_task_or_group is deprecated in 0.4.13 but returns the task itself
        warnings.simplefilter("ignore", DeprecationWarning)
        task = TaskManager(include_defaults=False, include_path=str(root)).load_task_or_group([name])[name]
    task.build_all_requests(rank=0, world_size=1)
    return list(task.instances)


def hf_checkpoint(root: Path, max_length: int) -> Path:
    """A Hugging Face directory: random fp32 LlamaForCausalLM of config S with a `max_length` context
    and the built-in tokenizer."""
    import torch
    import transformers

    from llama_jax.data.tokenizer import builtin_tokenizer
    from llama_jax.model.config import load_model_config
    from llama_jax.model.external_config import hf_config_dict

    cfg = load_model_config("tiny", ["dtype=float32", "attention_impl=xla", f"max_seq_len={max_length}"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg))).float().eval()
    out = root / "hf"
    model.save_pretrained(out)
    tok = builtin_tokenizer(cfg.vocab_size, str(root / "tokenizer"))
    (out / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
    return out


def rolling_document(root: Path, tok, max_length: int, seed: int = 1) -> str:
    """A text of about max_length - 1 tokens (with the prefix token in front: one whole rolling window
    of the model's context), saved for the children."""
    rng = np.random.default_rng(seed)
    pieces = [words(rng, 50) + "." for _ in range(max_length // 40 + 1)]
    text = tok.decode(tok.encode(" ".join(pieces), bos=False)[:max_length - 1])
    (root / "rolling.txt").write_text(text)
    return text


def backend(name: str, checkpoint: Path, batch_size: int):
    """llama_jax's lm-eval model or lm-eval's HFLM on `checkpoint`, fp32, `batch_size` rows."""
    if name == "llama_jax":
        from llama_jax.evaluation.harness import lm_class
        from llama_jax.evaluation.loading import load_eval_model

        return lm_class()(model=load_eval_model(str(checkpoint), dtype="fp32"), batch_size=batch_size,
                          max_gen_toks=NEW_TOKENS)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(checkpoint), backend="causal", dtype="float32", batch_size=batch_size, device="cpu",
                add_bos_token=True)


def job_requests(root: Path, job: str) -> tuple[str, list]:
    """(the lm-eval method, its requests) of job mc, gen or rolling."""
    if job == "rolling":
        from lm_eval.api.instance import Instance

        text = (root / "rolling.txt").read_text()
        return "loglikelihood_rolling", [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,),
                                                  idx=0)]
    return ("loglikelihood", task_requests(root, "bench_mc")) if job == "mc" else \
        ("generate_until", task_requests(root, "bench_gen"))


def child(args) -> None:
    """One backend, one job, once: prints its answers' summary and peak RSS as JSON."""
    root = Path(args.root)
    lm = backend(args.child, root / "hf", args.batch_size)
    method, requests = job_requests(root, args.job)
    start = time.perf_counter()
    out = getattr(lm, method)(requests, disable_tqdm=True)
    seconds = time.perf_counter() - start
    answers = [o[0] if isinstance(o, tuple) else o for o in out]
    print(json.dumps({"peak_rss": peak_rss(), "seconds": seconds, "answers": answers}))


def run_child(name: str, job: str, root: Path, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--job", job, "--root", str(root), "--batch-size",
           str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} {job} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(root: Path, batch_size: int, jobs: list[str]) -> None:
    """Peak RSS of each backend on each job, each in its own process; checks the rolling answers agree."""
    for job in jobs:
        ours, theirs = (run_child(name, job, root, batch_size) for name in ("llama_jax", "hf"))
        print(f"rss {job}: llama_jax {ours['peak_rss'] / 1e9:.2f} GB, lm-eval HF {theirs['peak_rss'] / 1e9:.2f} GB "
              f"-> {ours['peak_rss'] / theirs['peak_rss']:.2f}x ({ours['seconds']:.1f} s / {theirs['seconds']:.1f} s, "
              f"llama_jax's with compilation)", flush=True)
        if job == "rolling":
            diff = abs(ours["answers"][0] - theirs["answers"][0])
            print(f"check rolling: log-likelihood {ours['answers'][0]:.4f} vs {theirs['answers'][0]:.4f}, "
                  f"difference {diff:.2e}", flush=True)


def timed(fn, requests) -> tuple[float, list]:
    start = time.perf_counter()
    out = fn(requests, disable_tqdm=True)
    return time.perf_counter() - start, out


def compare(name: str, n_items: int, ours, theirs, repeats: int) -> tuple[list, list]:
    """Warm-up round, then `repeats` alternating timed rounds; prints the ratio line; returns the answers."""
    first, ours_out = timed(ours[0], ours[1])
    _, theirs_out = timed(theirs[0], theirs[1])
    ours_rates, theirs_rates = [], []
    for _ in range(repeats):
        seconds, _ = timed(ours[0], ours[1])
        ours_rates.append(n_items / seconds)
        seconds, _ = timed(theirs[0], theirs[1])
        theirs_rates.append(n_items / seconds)
    a, b = max(ours_rates), max(theirs_rates)
    print(f"ratio {name}: llama_jax {a:,.1f} items/s, lm-eval HF {b:,.1f} items/s -> {a / b:.2f}x (medians "
          f"{statistics.median(ours_rates):,.1f} / {statistics.median(theirs_rates):,.1f}; llama_jax's first "
          f"call with compilation {first:.1f} s)", flush=True)
    return ours_out, theirs_out


def speed(args, root: Path) -> None:
    """Both backends in this process, alternating: the ratio and check lines of each task."""
    ours, theirs = (backend(name, root / "hf", args.batch_size) for name in ("llama_jax", "hf"))
    if "mc" in args.tasks:
        _, requests = job_requests(root, "mc")
        lengths = [len(ours.tok_encode(r.args[0] + r.args[1])) for r in requests]
        print(f"multiple choice: {args.mc_items} items, {len(requests)} requests of {min(lengths)}-"
              f"{max(lengths)} tokens", flush=True)
        got, want = compare("multiple_choice", args.mc_items, (ours.loglikelihood, requests),
                            (theirs.loglikelihood, requests), args.repeats)
        diff = max(abs(g[0] - w[0]) for g, w in zip(got, want))
        print(f"check multiple_choice: largest log-likelihood difference {diff:.2e}", flush=True)
    if "gen" in args.tasks:
        _, requests = job_requests(root, "gen")
        lengths = [len(ours.tok_encode(r.args[0])) for r in requests]
        print(f"generative: {args.gen_items} prompts of {min(lengths)}-{max(lengths)} tokens, {NEW_TOKENS} new "
              f"tokens", flush=True)
        got, want = compare("generative", args.gen_items, (ours.generate_until, requests),
                            (theirs.generate_until, requests), args.repeats)
        same = sum(g == w for g, w in zip(got, want))
        print(f"check generative: {same} of {len(got)} greedy completions identical", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mc-items", type=int, default=256)
    parser.add_argument("--gen-items", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=8192, help="the checkpoint's max_position_embeddings")
    parser.add_argument("--tasks", default="mc,gen,rss", help="which of mc, gen (speed) and rss (memory) to run")
    parser.add_argument("--child", choices=("llama_jax", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--job", choices=("mc", "gen", "rolling"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import jax
    import lm_eval
    import torch
    import transformers

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}; jax "
          f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, lm-eval {lm_eval.__version__}; fp32 both, batch {args.batch_size}, "
          f"max_length {args.max_length}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        task_files(root, args.mc_items, args.gen_items)
        hf_checkpoint(root, args.max_length)
        if "mc" in args.tasks or "gen" in args.tasks:
            speed(args, root)
        if "rss" in args.tasks:
            from llama_jax.data.tokenizer import load_tokenizer

            tok = load_tokenizer(str(root / "hf" / "tokenizer.model"))
            rolling_document(root, tok, args.max_length)
            memory(root, args.batch_size, [job for job in ("mc", "gen") if job in args.tasks] + ["rolling"])
    return 0


if __name__ == "__main__":
    tune_host_allocator()  # as eval.py does; it applies to both backends here (and to the children)
    with contextlib.nullcontext() if "--child" in sys.argv else monitor():  # a child reports to its parent
        sys.exit(main())
