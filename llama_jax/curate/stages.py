"""Each stage as the datatrove phases that run it.

A stage reads the previous stage's JSONL output (`read`, always first, reads the raw input format) and
writes its own, counting documents and bytes on the way in and out for the funnel. A stage needing a
corpus-wide view (dedup, perplexity cutoffs) is several phases, each one executor job: datatrove's
dedup blocks find duplicates from signatures written by an earlier phase. The phases of a stage that
read the same input use the same task count, so document indices line up between them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llama_jax.curate.config import CurateConfig, SourceCuration


@dataclass(frozen=True)
class Phase:
    source: str
    stage: str
    step: str
    pipeline: list
    tasks: int
    logging_dir: str


@dataclass(frozen=True)
class StageDirs:
    input: str
    output: str
    work: str
    funnel: str


@dataclass(frozen=True)
class ResolvedModels:
    language: str
    kenlm: str
    sentencepiece: str
    reference: str
    cutoffs: tuple[float, float] | None  # the quality stage's fixed perplexity cutoffs (None: corpus percentiles)


def stage_dirs(root: Path, source: str, index: int, stage: str, previous: str) -> StageDirs:
    tag = f"{index:02d}_{stage}"
    return StageDirs(input=previous, output=str(root / source / tag), work=str(root / "work" / source / tag),
                     funnel=str(root / "funnel" / source / tag))


def _reader(dirs: StageDirs, folder: str | None = None):
    from llama_jax.curate.blocks.readers import SafeJsonlReader

    return SafeJsonlReader(folder or dirs.input, skipped_dir=f"{dirs.funnel}/skipped")


def _counted(dirs: StageDirs, blocks: list, reader=None) -> list:
    """reader -> count in -> blocks -> drop emptied docs -> count out -> write the stage's output."""
    from llama_jax.curate.blocks.empty import DropEmpty
    from llama_jax.curate.blocks.tally import FunnelCounter
    from llama_jax.curate.blocks.writer import StageWriter

    return [reader or _reader(dirs), FunnelCounter(f"{dirs.funnel}/in"), *blocks, DropEmpty(),
            FunnelCounter(f"{dirs.funnel}/out"), StageWriter(dirs.output)]


def document_text(doc) -> str:
    """Exact dedup's content key: the whole text (module-level so executors can pickle it)."""
    return doc.text


def _read(cfg: CurateConfig, src: SourceCuration, dirs: StageDirs, path: str) -> list[tuple[str, list, int]]:
    from llama_jax.curate.blocks.readers import SafeJsonlReader

    if src.format in ("jsonl", "sample"):
        reader = SafeJsonlReader(path, skipped_dir=f"{dirs.funnel}/skipped", text_key=src.text_field)
    elif src.format == "wet":
        from datatrove.pipeline.readers.warc import WarcReader

        reader = WarcReader(path)
    elif src.format == "wikipedia_xml":
        from llama_jax.curate.blocks.wikipedia import WikipediaDumpReader

        reader = WikipediaDumpReader(path)
    else:
        from llama_jax.curate.blocks.stackexchange import StackExchangeReader

        reader = StackExchangeReader(path)
    return [("read", _counted(dirs, [], reader=reader), cfg.executor.tasks)]


def _line_dedup(cfg, dirs, models):
    from datatrove.pipeline.dedup.sentence_dedup import (SentDedupConfig, SentenceDedupSignature,
                                                         SentenceFindDedups)

    from llama_jax.curate.blocks.line_dedup import LineDedupFilter
    from llama_jax.curate.blocks.words import WhitespaceTokenizer

    # Length rules are LineDedupFilter's (the same for every page); datatrove's only drop emptied pages.
    config = SentDedupConfig(n_sentences=1, split_sentences=False, min_doc_words=0, min_num_sentences=0)
    sigs, dups = f"{dirs.work}/signatures", f"{dirs.work}/duplicates"
    rules = cfg.line_dedup
    return [("signatures", [_reader(dirs), SentenceDedupSignature(sigs, finder_workers=1, config=config,
                                                                   language=WhitespaceTokenizer())],
             cfg.executor.tasks),
            ("find", [SentenceFindDedups(sigs, dups, config=config)], 1),
            ("filter", _counted(dirs, [LineDedupFilter(dups, config, rules.min_doc_words, rules.min_kept_share)]),
             cfg.executor.tasks)]


def _language(cfg, dirs, models):
    from llama_jax.curate.blocks.classify import LocalFastTextFilter

    keep = [(lang, cfg.language.min_score) for lang in cfg.language.languages]
    return [("filter", _counted(dirs, [LocalFastTextFilter(models.language, keep)]), cfg.executor.tasks)]


def _quality(cfg, dirs, models):
    """Fixed cutoffs (the default): score and bucket in one pass. Corpus percentiles: score (all tasks) ->
    percentile cutoffs (one task) -> bucket filter over the scored pages (they are the stage's input with
    a score added, so the filter phase counts them as the stage's input)."""
    from llama_jax.curate.blocks.quality import KenLMScorer, PerplexityBucketFilter, PerplexityCutoffs
    from llama_jax.curate.blocks.writer import StageWriter

    scorer = KenLMScorer(models.kenlm, models.sentencepiece)
    if models.cutoffs is not None:
        bucket_filter = PerplexityBucketFilter(cfg.quality.keep_buckets, cutoffs=models.cutoffs)
        return [("filter", _counted(dirs, [scorer, bucket_filter]), cfg.executor.tasks)]
    scored, cutoffs = f"{dirs.work}/scored", f"{dirs.work}/cutoffs.json"
    score = [_reader(dirs), scorer, StageWriter(scored)]
    bucket_filter = PerplexityBucketFilter(cfg.quality.keep_buckets, cutoffs_file=cutoffs)
    return [("score", score, cfg.executor.tasks),
            ("cutoffs", [_reader(dirs, scored), PerplexityCutoffs(cutoffs, cfg.quality.corpus_percentiles)], 1),
            ("filter", _counted(dirs, [bucket_filter], reader=_reader(dirs, scored)), cfg.executor.tasks)]


def _reference(cfg, dirs, models):
    from llama_jax.curate.blocks.classify import LocalFastTextFilter

    keep = [("reference", cfg.reference.min_score)]
    return [("filter", _counted(dirs, [LocalFastTextFilter(models.reference, keep)]), cfg.executor.tasks)]


def _minhash(cfg, dirs, models):
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)

    from llama_jax.curate.blocks.words import WhitespaceTokenizer

    m = cfg.minhash
    config = MinhashConfig(n_grams=m.n_grams, num_buckets=m.num_buckets, hashes_per_bucket=m.hashes_per_bucket,
                           seed=m.seed)
    sigs, buckets, remove = (f"{dirs.work}/{name}" for name in ("signatures", "buckets", "remove_ids"))
    return [("signatures", [_reader(dirs), MinhashDedupSignature(sigs, config=config, language=WhitespaceTokenizer())], cfg.executor.tasks),
            ("buckets", [MinhashDedupBuckets(sigs, buckets, config=config)], m.num_buckets),
            ("cluster", [MinhashDedupCluster(buckets, remove, config=config)], 1),
            ("filter", _counted(dirs, [MinhashDedupFilter(remove)]), cfg.executor.tasks)]


def _exact_dedup(cfg, dirs, models):
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)

    config = ExactDedupConfig(content_getter=document_text)
    sigs, dups = f"{dirs.work}/signatures", f"{dirs.work}/duplicates"
    return [("signatures", [_reader(dirs), ExactDedupSignature(sigs, config=config)], cfg.executor.tasks),
            ("find", [ExactFindDedups(sigs, dups, config=config)], 1),
            ("filter", _counted(dirs, [ExactDedupFilter(dups, config=config)]), cfg.executor.tasks)]


def _c4_rules(cfg, dirs, models):
    from datatrove.pipeline.filters.c4_filters import C4QualityFilter

    return [("filter", _counted(dirs, [C4QualityFilter()]), cfg.executor.tasks)]


def _github_rules(cfg, dirs, models):
    from llama_jax.curate.blocks.code import GitHubRulesFilter

    return [("filter", _counted(dirs, [GitHubRulesFilter(cfg.github_rules)]), cfg.executor.tasks)]


def _license_strip(cfg, dirs, models):
    from llama_jax.curate.blocks.code import LicenseHeaderStripper

    return [("format", _counted(dirs, [LicenseHeaderStripper()]), cfg.executor.tasks)]


def _book_dedup(cfg, dirs, models):
    from llama_jax.curate.blocks.books import BookOverlapDedup

    return [("dedup", _counted(dirs, [BookOverlapDedup(cfg.book_dedup)]), 1)]


def _latex_clean(cfg, dirs, models):
    from llama_jax.curate.blocks.latex import LatexCleaner

    return [("format", _counted(dirs, [LatexCleaner()]), cfg.executor.tasks)]


STAGE_BUILDERS = {"line_dedup": _line_dedup, "language": _language, "quality": _quality,
                  "reference": _reference, "minhash": _minhash, "exact_dedup": _exact_dedup,
                  "c4_rules": _c4_rules, "github_rules": _github_rules, "license_strip": _license_strip,
                  "book_dedup": _book_dedup, "latex_clean": _latex_clean}


def source_phases(cfg: CurateConfig, src: SourceCuration, input_path: str,
                  models: ResolvedModels) -> tuple[list[Phase], str]:
    """The phases of one source, in order, and the folder its curated output ends in."""
    root, phases = cfg.root, []
    previous = input_path
    for index, stage in enumerate(["read", *src.stages]):
        dirs = stage_dirs(root, src.name, index, stage, previous)
        steps = (_read(cfg, src, dirs, input_path) if stage == "read"
                 else STAGE_BUILDERS[stage](cfg, dirs, models))
        for step, pipeline, tasks in steps:
            logging_dir = str(root / "logs" / src.name / f"{index:02d}_{stage}.{step}")
            phases.append(Phase(src.name, stage, step, pipeline, tasks, logging_dir))
        previous = dirs.output
    return phases, previous
