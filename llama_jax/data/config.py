"""What the data pipeline reads: a mixture of sources for training and a list for validation.

Plain types only (str/int/float/bool/list/nested dataclasses), every field defaulted, so the training
config can embed `DataConfig` and load it from YAML with the project's generic loader. `DataConfig()` is
the built-in demo corpus (the Python standard library's source files, see `corpus.py`): training on its
train files, validating on its validation files, no download needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from llama_jax.data.chat_records import field_renames
from llama_jax.data.chat_template import TEMPLATE_CHOICES
from llama_jax.utils.config_io import ConfigError

CHAT_KINDS = ("alpaca", "sharegpt", "chat")  # conversations for fine-tuning, see chat_records.py
SOURCE_KINDS = ("builtin", "text", "jsonl", "tfds", "curated", *CHAT_KINDS)
BUILTIN_SPLITS = ("train", "validation")


@dataclass(frozen=True)
class SourceConfig:
    """One source of documents.

    kind="builtin": the demo corpus; `split` is "train" or "validation".
    kind="text":    `path` is a file, a directory (every file under it) or a glob; one file = one document.
    kind="jsonl":   `path` as for text; one line = one JSON object = one document, its text in
                    `text_field`. `skip_bad_lines` skips (and counts) lines that are not JSON or lack the
                    field instead of failing.
    kind="tfds":    the TensorFlow Datasets dataset `name` (optionally "name:version" or "name/config"),
                    its `split`, read with `tfds.data_source` (array_record, no TensorFlow) from `data_dir`
                    ("" = TFDS's default); the text is feature `text_field`.
    kind="curated": `path` is the output directory of `python -m llama_jax.curate` (its mixture): the
                    shards its manifest lists, read as JSONL; the curated sources are already mixed in
                    the configured proportions inside them.
    kind="alpaca" | "sharegpt" | "chat": `path` as for jsonl; one line = one conversation (formats in
                    `llama_jax/data/chat_records.py`); `skip_bad_lines` skips (and counts) bad records.
                    Or, instead of `path`, a TFDS dataset's `name`, `split` and `data_dir` as for tfds: one
                    record = one conversation. `fields` renames the dataset's fields to the format's, as
                    "format_field=dataset_field" items (e.g. [instruction=question, output=answer]).
    `weight` is the source's sampling weight in the training mixture (normalised over the sources).
    """

    kind: str = "builtin"
    path: str = ""
    text_field: str = "text"
    name: str = ""
    split: str = "train"
    data_dir: str = ""
    weight: float = 1.0
    skip_bad_lines: bool = False
    fields: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"source kind: {self.kind!r} is not one of {list(SOURCE_KINDS)}")
        if self.kind in ("text", "jsonl", "curated") and not self.path:
            raise ConfigError(f"source path: a {self.kind} source needs a file, directory or glob")
        if self.kind in CHAT_KINDS and bool(self.path) == bool(self.name):
            raise ConfigError(f"source path/name: a {self.kind} source needs either a path (JSONL) or a name "
                              f"(TFDS dataset){', not both' if self.path else ''}")
        if self.fields and self.kind not in CHAT_KINDS:
            raise ConfigError(f"source fields: only conversation sources ({', '.join(CHAT_KINDS)}) rename fields")
        try:
            field_renames(self.fields)
        except ValueError as e:
            raise ConfigError(f"source {e}") from None
        if self.kind == "tfds" and not self.name:
            raise ConfigError("source name: a tfds source needs a dataset name")
        if self.kind == "builtin" and self.split not in BUILTIN_SPLITS:
            raise ConfigError(f"source split: the builtin corpus has splits {list(BUILTIN_SPLITS)}, "
                              f"got {self.split!r}")
        if self.kind in ("jsonl", "tfds") and not self.text_field:
            raise ConfigError("source text_field: must name the field that holds the text")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"source weight: must be a finite number > 0, got {self.weight}")

    def describe(self) -> str:
        """Short name for messages and logs."""
        if self.kind == "tfds":
            return f"tfds:{self.name}[{self.split}]"
        if self.kind in CHAT_KINDS and self.name:
            return f"{self.kind}:tfds:{self.name}[{self.split}]"
        if self.kind == "builtin":
            return f"builtin[{self.split}]"
        return f"{self.kind}:{self.path}"


@dataclass(frozen=True)
class DataConfig:
    """Training mixture, validation sources, shuffling seed and an optional token-id cache.

    cache_dir: where tokenized sources are kept (keyed by source contents and tokenizer file) so later
    runs skip tokenization; "" tokenizes in memory every run.
    chat_template: for conversation sources (fine-tuning): how conversations become tokens and which
    tokens are targets; `llama2`, `llama3`, `llama3.1`, `alpaca` or `tokenizer` (see chat_template.py).
    chat_date: the date a template writes (`date_string`: LLaMA 3.1's "Today Date: 26 Jul 2024" line);
    "" keeps the template's own default.
    """

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(kind="builtin", split="train")])
    validation_sources: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig(kind="builtin", split="validation")])
    seed: int = 0
    shuffle: bool = True
    cache_dir: str = ""
    chat_template: str = "llama3"
    chat_date: str = ""

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("data.sources: at least one training source is needed")
        for key in ("sources", "validation_sources"):
            for i, src in enumerate(getattr(self, key)):
                if not isinstance(src, SourceConfig):
                    raise ConfigError(f"data.{key}[{i}]: expected a SourceConfig, got {type(src).__name__}")
        kinds = {src.kind in CHAT_KINDS for src in [*self.sources, *self.validation_sources]}
        if len(kinds) > 1:
            raise ConfigError("data: conversation sources (alpaca, sharegpt, chat) cannot be mixed with plain-text "
                              "sources, in training or validation")
        if self.chat_template not in TEMPLATE_CHOICES:
            raise ConfigError(f"data.chat_template: {self.chat_template!r} is not one of {list(TEMPLATE_CHOICES)}")

    @property
    def is_chat(self) -> bool:
        """Fine-tuning on conversations (loss on assistant turns only) rather than pretraining on text."""
        return self.sources[0].kind in CHAT_KINDS
