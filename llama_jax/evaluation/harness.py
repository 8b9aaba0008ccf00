"""llama_jax as an lm-evaluation-harness model, registered as "llama_jax".

`lm_class()` imports lm-eval (only then: the model code never needs it) and returns the `TemplateLM`
subclass, registered: once it has been called, `lm_eval.simple_evaluate(model="llama_jax",
model_args="pretrained=CHECKPOINT")` works too (the `lm_eval` command line does not import llama_jax).
Requests of one type arrive together and are batched here:

- loglikelihood: lm-eval's own encoding of (context, continuation) pairs (TemplateLM), then
  `TokenScorer.score_continuations` (each distinct context once; a pair longer than max_length + 1
  tokens cut on the left, as its HF backend cuts it).
- loglikelihood_rolling: `perplexity.rolling_windows` (lm-eval's windows) over prefix + tokens.
- generate_until: the jitted decode loop, prompts sorted by length in batches of `batch_size` rows and
  length-bucket widths; text cut at the `until` strings and at EOS; `max_gen_toks` (default 256);
  greedy unless `do_sample`, else temperature/top_k/top_p. Identical sampled requests (lm-eval's
  `repeats: k`) get seeds seed, seed + 1, ..., so `majority_vote` sees k different samples (maj@k).

Token conventions follow lm-eval's HF backend: `tok_encode` adds BOS when the tokenizer's convention
does (`Tokenizer.adds_bos`; `add_bos_token=True`/`False` overrides it), the prefix token (empty contexts, the first rolling window) is BOS, the context
of a generation is cut on the left to max_length - max_gen_toks tokens. The model is one SPMD program
over all devices and hosts, so the LM reports rank 0 of 1 to lm-eval: every process runs every request.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from llama_jax.evaluation.generate import Generator, SamplingConfig, generate_texts
from llama_jax.evaluation.loading import EvalModel
from llama_jax.evaluation.perplexity import token_logprobs
from llama_jax.evaluation.scoring import TokenScorer

_CLASS = None


def unparsable_task_files(include_path: str) -> list[str]:
    """"FILE: invalid YAML: PROBLEM at line L, column C" for each task YAML under `include_path` that does not
    parse, in lm-eval's order (sorted paths, every depth).

    lm-eval's task index skips such a file with only a debug log, so its task then looks unknown: the
    caller names these files when a task is not found. Tags (`!function utils.f`) are accepted unresolved
    here; lm-eval resolves them itself.
    """
    from pathlib import Path

    import yaml

    from llama_jax.utils.config_io import yaml_problem

    class TaskLoader(yaml.SafeLoader):
        """Safe YAML that reads any `!tag` (lm-eval's `!function`) as nothing."""

    TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    problems = []
    for path in sorted(Path(include_path).glob("**/*.yaml"), key=lambda p: p.as_posix()):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=TaskLoader)  # a SafeLoader: plain data only
        except UnicodeDecodeError as e:
            problems.append(f"{path}: not UTF-8 text (byte {e.start})")
        except yaml.YAMLError as e:
            problems.append(f"{path}: invalid YAML: {yaml_problem(e)}")
        except RecursionError:
            problems.append(f"{path}: invalid YAML: nested too deeply")
    return problems


def _sampling(kwargs: dict, default_max: int, seed: int) -> tuple[SamplingConfig, list[str]]:
    """lm-eval generation kwargs as (our sampling config, stop strings)."""
    kwargs = dict(kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", default_max)))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if not kwargs.pop("do_sample", temperature > 0):
        temperature = 0.0
    return SamplingConfig(max_new_tokens=max_new, temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                          top_p=float(kwargs.pop("top_p", 1.0) or 1.0), seed=seed), until


def lm_class():
    """The registered lm-eval model class (built on first use)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import simple_parse_args_string

    @register_model("llama_jax")
    class LlamaJaxLM(TemplateLM):
        def __init__(self, model: EvalModel | None = None, pretrained: str | None = None, *, batch_size: int = 16,
                     max_gen_toks: int = 256, add_bos_token: bool | str | None = None, dtype: str = "bf16", seed: int = 0,
                     tokenizer: str | None = None, **_ignored: Any):
            super().__init__()
            if model is None:
                from llama_jax.evaluation.loading import load_eval_model

                model = load_eval_model(pretrained, dtype=dtype, tokenizer_path=tokenizer)
            self.model, self.tok = model, model.tokenizer
            self.batch_size, self.max_gen_toks, self.seed = int(batch_size), int(max_gen_toks), int(seed)
            self.add_bos_token = (self.tok.adds_bos if add_bos_token in (None, "None", "")
                                  else add_bos_token in (True, "True", "true", "1", 1))
            self.scorer = TokenScorer(model, batch_size=self.batch_size)
            self._generators: dict[tuple, Generator] = {}

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = simple_parse_args_string(arg_string)
            args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"})
            return cls(**args)

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tok.bos_id

        @property
        def max_length(self) -> int:
            return self.model.cfg.max_seq_len

        def tok_encode(self, string: str, **kwargs) -> list[int]:
            return self.tok.encode(string, bos=self.add_bos_token)

        def tok_decode(self, tokens) -> str:
            return self.tok.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            scored = self.scorer.score_continuations([(ctx, cont) for _, ctx, cont in requests])
            return [(float(logp.sum()), bool(greedy.all())) for logp, greedy in scored]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            docs = [[self.prefix_token_id] + self.tok_encode(r.args[0]) for r in requests]
            return [float(lp.sum()) for lp in token_logprobs(self.scorer, docs, context_len=self.max_length)]

        def _generator(self, sampling: SamplingConfig) -> Generator:
            key = (sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p)
            if key not in self._generators:
                self._generators[key] = Generator(self.model, sampling)
            return self._generators[key]

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            # Group by (generation kwargs, repeat index): one decode run per group, its own seed.
            groups: dict[tuple[str, int], list[int]] = defaultdict(list)
            seen: dict[tuple[str, str], int] = defaultdict(int)
            for i, r in enumerate(requests):
                context, kwargs = r.args
                key = json.dumps(kwargs, sort_keys=True, default=str)
                repeat = seen[(context, key)]
                seen[(context, key)] += 1
                groups[(key, repeat)].append(i)
            out: list[str] = [""] * len(requests)
            for (key, repeat), indices in groups.items():
                sampling, until = _sampling(requests[indices[0]].args[1], self.max_gen_toks, self.seed + repeat)
                if sampling.greedy and repeat:  # greedy repeats are the same text: decode once
                    first = groups[(key, 0)]
                    by_context = {requests[i].args[0]: out[i] for i in first}
                    for i in indices:
                        out[i] = by_context[requests[i].args[0]]
                    continue
                gen = self._generator(sampling)
                prompts = [self.tok_encode(requests[i].args[0]) for i in indices]
                texts = generate_texts(gen, prompts, until=until, batch_size=self.batch_size, seed=sampling.seed)
                for i, text in zip(indices, texts):
                    out[i] = text
            return out

    _CLASS = LlamaJaxLM
    return LlamaJaxLM
