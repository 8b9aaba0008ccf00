"""A curation run: resolve inputs and models, plan every phase, run them on the configured executor.

Local and Ray runs execute the phases in order from this process; a Slurm run submits every phase as
an sbatch array depending on the previous one and returns. Each phase has its own logging directory,
where datatrove records completed tasks: a relaunched run skips them, so a killed run resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from llama_jax.curate.config import CurateConfig
from llama_jax.curate.cutoffs import CUTOFFS_FILE, read_cutoffs
from llama_jax.curate.errors import CurateError
from llama_jax.curate.models import lid176_path, require_file
from llama_jax.curate.stages import Phase, ResolvedModels, source_phases
from llama_jax.utils.extras import require

MIXTURE_DIR = "mixture"


def _sample_models(cfg: CurateConfig, report: Callable[[str], None]) -> tuple[str, str, str]:
    """For the built-in sample: quality models trained on its clean docstring pages (references) and
    its raw crawl pages (random), once per output directory. Returns (kenlm, sentencepiece, reference)."""
    from llama_jax.curate.quality_models import train_quality_models
    from llama_jax.curate.sample import docstring_pages, sample_pages

    models_dir = cfg.root / "models"
    done = models_dir / ".complete"
    if not (done.is_file() and (models_dir / CUTOFFS_FILE).is_file()):
        report(f"training the sample's quality models into {models_dir} ...")
        crawl = [r["text"] for r in sample_pages(min(cfg.sample_bytes, 2_000_000), seed=1)]
        train_quality_models(docstring_pages(), crawl, models_dir)
        done.touch()
    return str(models_dir / "kenlm.bin"), str(models_dir / "sp.model"), str(models_dir / "reference.ftz")


def _cutoffs(cfg: CurateConfig, kenlm: str) -> tuple[float, float] | None:
    """The quality stage's fixed cutoffs: the configured numbers, else the models' file; None when the
    run cuts at its own corpus percentiles."""
    if cfg.quality.corpus_percentiles:
        return None
    if cfg.quality.cutoffs:
        return cfg.quality.cutoffs[0], cfg.quality.cutoffs[1]
    path = cfg.models.cutoffs or str(Path(kenlm).expanduser().parent / CUTOFFS_FILE)
    return read_cutoffs(path)


def resolve_models(cfg: CurateConfig, report: Callable[[str], None]) -> ResolvedModels:
    """Model paths checked to exist (the stages that need them are known from the config)."""
    uses = {stage for src in cfg.sources for stage in src.stages}
    sample = any(src.format == "sample" for src in cfg.sources)
    language = (str(require_file(cfg.models.language, "models.language")) if cfg.models.language
                else str(lid176_path()) if "language" in uses or sample else "")
    if sample and not (cfg.models.kenlm or cfg.models.reference):
        kenlm, sentencepiece, reference = _sample_models(cfg, report)
    else:
        paths = {}
        for key, stage in (("kenlm", "quality"), ("sentencepiece", "quality"), ("reference", "reference")):
            value = getattr(cfg.models, key)
            paths[key] = str(require_file(value, f"models.{key}")) if stage in uses else value
        kenlm, sentencepiece, reference = paths["kenlm"], paths["sentencepiece"], paths["reference"]
    cutoffs = _cutoffs(cfg, kenlm) if "quality" in uses else None
    return ResolvedModels(language, kenlm, sentencepiece, reference, cutoffs)


def _input_path(cfg: CurateConfig, src, report: Callable[[str], None]) -> str:
    if src.format == "sample":
        from llama_jax.curate.sample import write_sample

        directory = cfg.root / "sample"
        report(f"writing the built-in sample ({cfg.sample_bytes / 1e6:.1f} MB) into {directory} ...")
        write_sample(directory, cfg.sample_bytes)
        return str(directory)
    path = Path(src.path).expanduser()
    if not path.exists():
        raise CurateError(f"sources ({src.name}).path: {path} does not exist")
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        raise CurateError(f"sources ({src.name}).path: directory {path} holds no files")
    return str(path)


def plan(cfg: CurateConfig, report: Callable[[str], None] = lambda line: None) -> list[Phase]:
    """Every phase of the run, in order: each source's stages, then the mixture, then the funnel."""
    from llama_jax.curate.blocks.mix import MixtureWriter
    from llama_jax.curate.blocks.report import FunnelReport

    models = resolve_models(cfg, report)
    phases, finals, tags = [], {}, {}
    for src in cfg.sources:
        source_plan, finals[src.name] = source_phases(cfg, src, _input_path(cfg, src, report), models)
        phases += source_plan
        tags[src.name] = list(dict.fromkeys(Path(p.logging_dir).name.split(".")[0] for p in source_plan))
    root = cfg.root
    if cfg.mixture.enabled:
        table = {m.name: m for m in cfg.mixture.sources}
        missing = [name for name in finals if name not in table]
        if missing:
            raise CurateError(f"mixture.sources: no weight for source {missing[0]!r} "
                              f"(listed: {sorted(table)}); add it or set mixture.enabled=false")
        mixer = MixtureWriter(finals, {n: table[n].weight for n in finals}, {n: table[n].epochs for n in finals},
                              str(root / MIXTURE_DIR), cfg.mixture.shard_tokens, cfg.mixture.seed,
                              str(root / "funnel" / "mixture" / "skipped"))
        phases.append(Phase("all", "mixture", "write", [mixer], 1, str(root / "logs" / "mixture")))
    phases.append(Phase("all", "funnel", "report", [FunnelReport(str(root), tags)], 1, str(root / "logs" / "funnel")))
    return phases


def make_executor(cfg: CurateConfig, phase: Phase, depends=None):
    ex = cfg.executor
    if ex.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(phase.pipeline, tasks=phase.tasks, workers=min(ex.workers, phase.tasks),
                                     logging_dir=phase.logging_dir)
    if ex.kind == "ray":
        require("curate", "the ray executor", ("ray",))
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(phase.pipeline, tasks=phase.tasks, workers=min(ex.workers, phase.tasks),
                                   logging_dir=phase.logging_dir, cpus_per_task=ex.ray.cpus_per_task,
                                   mem_per_cpu_gb=ex.ray.mem_per_cpu_gb)
    from datatrove.executor.slurm import SlurmPipelineExecutor

    s = ex.slurm
    sbatch_args = dict(item.split("=", 1) if "=" in item else (item, "") for item in s.sbatch_args)
    return SlurmPipelineExecutor(
        phase.pipeline, tasks=phase.tasks, workers=ex.workers, time=s.time, partition=s.partition,
        cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos,
        job_name=f"curate-{phase.source}-{phase.stage}-{phase.step}", logging_dir=phase.logging_dir,
        depends=depends, venv_path=s.venv_path or None, sbatch_args=sbatch_args or None)


def _source_input(cfg: CurateConfig, name: str) -> str:
    src = next(s for s in cfg.sources if s.name == name)
    return f"sources ({name}).path: {Path(src.path).expanduser()}"


def _require_documents(cfg: CurateConfig, name: str) -> None:
    """After a source's read phase: at least one document came out, else one error naming the input and
    what was wrong with it (rather than the next stage failing on an empty internal directory)."""
    from llama_jax.curate.blocks.tally import read_tally

    funnel = cfg.root / "funnel" / name / "00_read"
    if read_tally(funnel / "out").get("docs", 0):
        return
    src = next(s for s in cfg.sources if s.name == name)
    path = Path(src.path).expanduser()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    skipped = read_tally(funnel / "skipped")
    if not sum(p.stat().st_size for p in files):
        why = "empty" if path.is_file() else "its files are all empty"
    elif sum(skipped.values()):
        why = (f"no line is a JSON object with text in {src.text_field!r} ({skipped.get('not_utf8', 0)} not UTF-8, "
               f"{skipped.get('bad_json', 0)} not JSON, {skipped.get('no_text', 0)} without text)")
    else:
        why = f"nothing in it reads as {src.format} documents"
    raise CurateError(f"{_source_input(cfg, name)}: no documents read: {why}")


def _ensure_ray(cfg: CurateConfig) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.executor.ray.address or None, include_dashboard=False, log_to_driver=False)


WORKER_LOG = Path("logs") / "workers.log"  # under the output directory: where the command line sends stderr


def execute(cfg: CurateConfig, report: Callable[[str], None] = print) -> list[Phase]:
    """Run (local, Ray) or submit (Slurm) every phase; returns the phases. datatrove's task logs go to
    stderr as the caller has it (the command line sends them to `WORKER_LOG`)."""
    phases = plan(cfg, report)
    if cfg.executor.kind == "slurm":
        previous = None
        for phase in phases:
            previous = make_executor(cfg, phase, depends=previous)
        previous.run()  # launches the chain, each job after the one it depends on
        report(f"submitted {len(phases)} Slurm array jobs; launch scripts under {cfg.root / 'logs'}")
        return phases
    if cfg.executor.kind == "ray":
        _ensure_ray(cfg)
    for number, phase in enumerate(phases, start=1):
        report(f"[{number:>2}/{len(phases)}] {phase.source:<14} {phase.stage:<12} {phase.step:<10} "
               f"({phase.tasks} task{'s' if phase.tasks > 1 else ''})")
        try:
            make_executor(cfg, phase).run()
        except CurateError:
            raise
        except Exception as e:  # a worker's failure: keep the one line, point at the full log
            cause = e
            while cause.__cause__ is not None and not isinstance(cause, CurateError):
                cause = cause.__cause__
            if isinstance(cause, CurateError):
                raise cause from None
            where = (f"{_source_input(cfg, phase.source)}: unreadable input" if phase.stage == "read"
                     else f"{phase.source}/{phase.stage}/{phase.step} failed")
            raise CurateError(f"{where}: {e} (task logs: {phase.logging_dir}/logs)") from e
        if phase.stage == "read" and phase.source in {s.name for s in cfg.sources if s.format != "sample"}:
            _require_documents(cfg, phase.source)
    return phases
