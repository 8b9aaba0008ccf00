"""The options of `llama-jax-eval`'s subcommands, one frozen dataclass each, validated once when built.

They are configs like a training run's: `llama_jax.utils.config_io.from_dict` builds them from the
command line's flags (generated from these fields by `llama_jax.cli.options`) and `key=value` overrides
(`mesh.fsdp=2`, `dtype=float32`), and the mesh and multi-host settings are the training config's own
`MeshConfig` and `DistributedConfig`. Every check that needs no file runs here, before anything is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llama_jax.convert.common import FORMATS
from llama_jax.data.chat_template import TEMPLATE_CHOICES
from llama_jax.evaluation.generate import SamplingConfig
from llama_jax.evaluation.loading import EVAL_DTYPES, compute_dtype
from llama_jax.evaluation.runner import RunOptions
from llama_jax.evaluation.sandbox import Limits
from llama_jax.parallel.distributed import DistributedConfig
from llama_jax.parallel.mesh import MeshConfig
from llama_jax.utils import dtypes
from llama_jax.utils.config_io import ConfigError, check_choices

UNSAFE_CODE_HELP = "consent to running model-written code for "


def _opt(default=None, text: str = "", **metadata):
    """A field with a default, its help `text` and any other metadata (`choices`, ...)."""
    return field(default=default, metadata={"help": text, **metadata})


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """Which checkpoint, read how, on which mesh: what every model-loading subcommand shares."""

    checkpoint: str = field(metadata={"positional": True,
                                      "help": "run dir, params dir, Meta or Hugging Face checkpoint directory"})
    format: str | None = _opt(None, "checkpoint format (default: detected)", choices=FORMATS)
    tokenizer: str | None = _opt(None, "tokenizer file (default: the checkpoint's own)")
    dtype: str = _opt("bfloat16", "compute and weight dtype", choices=dtypes.spellings(EVAL_DTYPES))
    bos: bool | None = _opt(None, "put BOS in front of each text (default: as the tokenizer's own convention says)",
                            no_help="do not put BOS in front of each text")
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        object.__setattr__(self, "dtype", compute_dtype(self.dtype))  # stored canonical
        check_choices(self)


@dataclass(frozen=True, kw_only=True)
class CodeOptions:
    """How generated programs run (`tasks`' code tasks and `score-code`)."""

    code_timeout: float = _opt(10.0, "seconds per generated program")
    code_workers: int = _opt(0, "programs run at once (0: the CPU count)")
    unsafe_run_generated_code: bool = _opt(False, UNSAFE_CODE_HELP + "code tasks where bubblewrap cannot run "
                                           "(audit hook only, no container)")

    @property
    def code_limits(self) -> Limits:
        return Limits(timeout_s=self.code_timeout, cpu_s=max(1, int(self.code_timeout)))


@dataclass(frozen=True, kw_only=True)
class PerplexityOptions(LoadOptions):
    data: list[str] = field(metadata={"help": "documents: a text file, directory or glob, a .jsonl file, "
                                              "tfds:NAME or builtin:validation"})
    text_field: str = _opt("text", "JSONL / TFDS field holding the text")
    split: str = _opt("validation", "TFDS split")
    data_dir: str = _opt("", "TFDS data_dir holding the prepared dataset")
    context_len: int | None = _opt(None, "window length (default: max_seq_len)")
    stride: int | None = _opt(None, "classic strided windows beginning every STRIDE tokens (default: "
                                    "lm-evaluation-harness's rolling windows)")
    batch_size: int = _opt(8)
    output: str | None = _opt(None, "also write the results to this JSON file")

    def __post_init__(self):
        """The window settings as the window schemes need them (0 is not "the default": it is refused
        like any other impossible value)."""
        super().__post_init__()
        for flag, value, least in (("--context-len", self.context_len, 2), ("--stride", self.stride, 1),
                                   ("--batch-size", self.batch_size, 1)):
            if value is not None and value < least:
                raise ConfigError(f"{flag} must be >= {least}, got {value}")
        if self.stride is not None and self.context_len is not None and self.stride >= self.context_len:
            raise ConfigError(f"--stride must be below --context-len ({self.context_len}), got {self.stride}")


@dataclass(frozen=True, kw_only=True)
class TasksOptions(LoadOptions, CodeOptions):
    tasks: str = field(metadata={"help": "comma-separated catalog names and/or .jsonl/.yaml task files"})
    data_dir: str | None = _opt(None, "TFDS data_dir holding the prepared datasets")
    split: str | None = _opt(None, "split for every TFDS task (default: each task's own)")
    limit: int | None = _opt(None, "score only the first N items of each task")
    batch_size: int = _opt(16)
    max_len: int | None = _opt(None, "longest sequence (default: max_seq_len)")
    output_dir: str | None = _opt(None, "write results.json and TASK.jsonl (per item) here")
    num_fewshot: int | None = _opt(None, "examples in front of each item (default: each task's own, 0 for files)")
    fewshot_seed: int = _opt(1234, "seed of the few-shot draw (lm-eval's default)")
    samples: int = _opt(1, "completions per generative/code item (maj@k, pass@k)")
    temperature: float = _opt(0.0, "0: greedy (needs samples 1)")
    top_k: int = _opt(0, "0: off")
    top_p: float = _opt(1.0, "1: off")
    seed: int = _opt(0, "sampling seed of the first sample (then +1 each)")
    max_new_tokens: int | None = _opt(None, "generation length (default: each task's)")

    def __post_init__(self):
        super().__post_init__()
        self.run_options()

    def run_options(self) -> RunOptions:
        return RunOptions(num_fewshot=self.num_fewshot, fewshot_seed=self.fewshot_seed, limit=self.limit,
                          samples=self.samples, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          seed=self.seed, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                          bos=self.bos, code_limits=self.code_limits, code_workers=self.code_workers,
                          allow_unsafe_code=self.unsafe_run_generated_code)


@dataclass(frozen=True, kw_only=True)
class ScoreCodeOptions(CodeOptions):
    task: str = field(metadata={"positional": True, "help": "a code task: humaneval, mbpp or a task file"})
    completions: str = field(metadata={"help": "JSONL, one {\"id\", \"completions\": [...]} per line"})
    data_dir: str | None = _opt(None, "directory holding mbpp/ (for mbpp)")
    output: str | None = _opt(None, "also write the results to this JSON file")


@dataclass(frozen=True, kw_only=True)
class HarnessOptions(LoadOptions):
    tasks: str = field(metadata={"help": "comma-separated lm-eval task names"})
    include_path: str | None = _opt(None, "directory of extra lm-eval task YAMLs")
    num_fewshot: int | None = _opt(None, "default: each task's own")
    limit: int | None = _opt(None, "first N documents of each task")
    output_dir: str | None = _opt(None, "write results.json and samples_TASK.jsonl here")
    batch_size: int = _opt(16)
    max_gen_toks: int = _opt(256, "generation length unless a task sets it")
    fewshot_seed: int = _opt(1234)
    seed: int = _opt(0, "sampling seed of the first repeat")
    unsafe_run_generated_code: bool = _opt(False, UNSAFE_CODE_HELP + "lm-eval's code tasks (lm-eval runs their "
                                           "programs itself, in-process, with no sandbox)")


@dataclass(frozen=True, kw_only=True)
class GenerateOptions(LoadOptions):
    prompt: list[str] = field(default_factory=list, metadata={"help": "a prompt (several: one batch)"})
    prompt_file: str | None = _opt(None, "a file of prompts, one per line")
    max_new_tokens: int = _opt(128)
    temperature: float = _opt(0.0, "0: greedy")
    top_k: int = _opt(0, "0: off")
    top_p: float = _opt(1.0, "1: off")
    seed: int = _opt(0)
    ignore_eos: bool = _opt(False, "always generate max_new_tokens")
    chat: str | None = _opt(None, "each prompt is a user turn in this chat template (as in fine-tuning); stops at "
                                  "its end-of-turn token", choices=TEMPLATE_CHOICES)
    system: str = _opt("", "with --chat: a system prompt before each prompt")
    chat_date: str | None = _opt(None, "with --chat: the date the template writes (LLaMA 3.1's 'Today Date'; "
                                       "default: the template's)")

    def __post_init__(self):
        super().__post_init__()
        self.sampling()

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed, stop_at_eos=not self.ignore_eos)


COMMANDS = {"perplexity": PerplexityOptions, "tasks": TasksOptions, "score-code": ScoreCodeOptions,
            "harness": HarnessOptions, "generate": GenerateOptions}
