"""Training the two quality models from reference pages (Wikipedia, or pages it cites) and random pages.

- KenLM 5-gram on the reference pages: CCNet-normalised lines, SentencePiece-encoded (a model trained
  here on the same lines), counted by `lmplz`, compiled by `build_binary`. Scores text "like the
  references" with low perplexity.
- fastText linear classifier, labels `reference` / `random`, with a small `dim` and `bucket`: its file
  is (words in its vocabulary + `bucket`) x `dim` x 4 bytes, rather than fastText's default ~800 MB.
- The perplexity cutoffs (`cutoffs.json`): percentiles of the perplexities of held-out reference pages
  (never seen by the KenLM model), or of a user's sample of pages, fixed from then on.

A share of both page sets is held out of training to measure the models (`diagnostics.py`).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llama_jax.curate.errors import CurateError
from llama_jax.curate.models import classifier_line, kenlm_tool
from llama_jax.curate.normalize import normalized_lines
from llama_jax.utils.files import write_atomically


@dataclass(frozen=True)
class QualityModels:
    kenlm: Path
    sentencepiece: Path
    reference: Path
    cutoffs: Path
    diagnostics: Path
    report: str  # the held-out figures, as printed
    warnings: tuple[str, ...]


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of a JSONL file (one object per line, text in `text_field`): strict, naming the
    file and line of any defect."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(f"{path}: file not found")
    texts = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CurateError(f"{path}:{number}: not a UTF-8 JSON line ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise CurateError(f"{path}:{number}: no string field {text_field!r}")
            texts.append(record[text_field])
    if not texts:
        raise CurateError(f"{path}: no documents")
    return texts


def _run(command: list[str], stdin_path: Path, stdout_path: Path | None = None) -> None:
    with stdin_path.open("rb") as stdin, (stdout_path.open("wb") if stdout_path else tempfile.TemporaryFile()) as out:
        result = subprocess.run(command, stdin=stdin, stdout=out, stderr=subprocess.PIPE)
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise CurateError(f"{Path(command[0]).name} failed: {' / '.join(tail)}")


def train_kenlm(references: list[str], out_dir: Path, order: int = 5, vocab_size: int = 4000) -> tuple[Path, Path]:
    """(KenLM binary, SentencePiece model) trained on the reference pages."""
    import sentencepiece

    lmplz, build_binary = kenlm_tool("lmplz"), kenlm_tool("build_binary")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp = Path(tmp)
        lines = [line for text in references for line in normalized_lines(text)]
        (tmp / "normalized.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(tmp / "normalized.txt"), model_prefix=str(out_dir / "sp"), vocab_size=vocab_size,
            character_coverage=0.9995, hard_vocab_limit=False, minloglevel=2)
        sp = sentencepiece.SentencePieceProcessor(model_file=str(out_dir / "sp.model"))
        encoded = "\n".join(" ".join(sp.encode(line, out_type=str)) for line in lines) + "\n"
        (tmp / "encoded.txt").write_text(encoded, encoding="utf-8")
        # --discount_fallback: small corpora lack the counts-of-counts Kneser-Ney discounts need.
        _run([lmplz, "-o", str(order), "-S", "20%", "-T", str(tmp), "--discount_fallback"],
             tmp / "encoded.txt", tmp / "model.arpa")
        _run([build_binary, str(tmp / "model.arpa"), str(out_dir / "kenlm.bin")], tmp / "encoded.txt")
    return out_dir / "kenlm.bin", out_dir / "sp.model"


def _train_fasttext(train_file: str, out_path: str, options: dict) -> None:
    """fastText supervised training and save, in this process; retried with the next seed when it stops
    with "Encountered NaN" (see `train_reference_classifier`)."""
    import fasttext

    seed = options.pop("seed")
    for attempt in range(5):
        try:
            fasttext.train_supervised(input=train_file, seed=seed + attempt, **options).save_model(out_path)
            return
        except RuntimeError as e:
            if "NaN" not in str(e):
                raise
    raise CurateError(f"fastText training diverged (NaN) 5 times on {train_file}; try a smaller dim or lr")


def train_reference_classifier(references: list[str], randoms: list[str], out_path: Path, dim: int = 16,
                               bucket: int = 10000, epoch: int = 20, seed: int = 0) -> Path:
    import random

    rows = ([f"__label__reference {classifier_line(t)}" for t in references]
            + [f"__label__random {classifier_line(t)}" for t in randoms])
    random.Random(seed).shuffle(rows)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
        options = dict(dim=dim, bucket=bucket, epoch=epoch, wordNgrams=2, minCount=1, lr=0.1, thread=1, seed=seed,
                       verbose=0)
        # In a fresh interpreter: fastText 0.9.2's training stops with "Encountered NaN" now and then in
        # a process that has loaded much else (JAX, datatrove; same file and seed, another outcome), and
        # never in a fresh one on the same inputs.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(_train_fasttext, (str(train_file), str(out_path), options))
    return out_path


def held_out_split(texts: list[str], share: float, what: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training pages, held-out pages): a seeded `share` of them (at least one) held out."""
    import random

    if len(texts) < 2:
        raise CurateError(f"{what}: {len(texts)} page(s); at least 2 are needed (one is held out to measure the models)")
    order = list(texts)
    random.Random(seed).shuffle(order)
    held = min(len(order) - 1, max(1, round(share * len(order))))
    return order[held:], order[:held]


@dataclass(frozen=True)
class CutoffSettings:
    """The quality cutoffs: `percentiles` (head, middle) of the perplexities of `sample` pages, or of the
    held-out reference pages when no sample is given."""

    percentiles: tuple[float, float] = (50.0, 99.0)
    sample: tuple[str, ...] = ()


def train_quality_models(references: list[str], randoms: list[str], out_dir: str | Path, order: int = 5,
                         vocab_size: int = 4000, dim: int = 16, bucket: int = 10000, held_out: float = 0.2,
                         cutoff: CutoffSettings = CutoffSettings(), min_score: float = 0.25) -> QualityModels:
    """The three models and the cutoffs, trained on all but a held-out share of each page set; the
    held-out pages measure them (`min_score`: the reference stage's threshold)."""
    import numpy as np

    from llama_jax.curate.blocks.quality import PerplexityModel
    from llama_jax.curate.cutoffs import CUTOFFS_FILE, write_cutoffs
    from llama_jax.curate.diagnostics import held_out_figures

    out_dir = Path(out_dir)
    ref_train, ref_held = held_out_split(references, held_out, "--reference")
    rand_train, rand_held = held_out_split(randoms, held_out, "--random")
    kenlm_bin, sp_model = train_kenlm(ref_train, out_dir, order, vocab_size)
    reference = train_reference_classifier(ref_train, rand_train, out_dir / "reference.ftz", dim, bucket)
    lm = PerplexityModel(str(kenlm_bin), str(sp_model))
    basis_pages = list(cutoff.sample) or ref_held
    scores = [s for s in (lm.perplexity(t) for t in basis_pages) if math.isfinite(s)]
    if not scores:
        raise CurateError("no page to compute the perplexity cutoffs from has any scorable text")
    head, middle = (float(c) for c in np.percentile(scores, list(cutoff.percentiles)))
    basis = "sample pages" if cutoff.sample else "held-out reference pages"
    write_cutoffs(out_dir / CUTOFFS_FILE, (head, middle), basis, list(cutoff.percentiles), len(scores))
    figures = held_out_figures(lm, str(reference), ref_held, rand_held, (head, middle), basis, min_score)
    write_atomically(out_dir / "diagnostics.json", json.dumps(figures.record, indent=1).encode())
    return QualityModels(kenlm_bin, sp_model, reference, out_dir / CUTOFFS_FILE, out_dir / "diagnostics.json",
                         figures.report, figures.warnings)
