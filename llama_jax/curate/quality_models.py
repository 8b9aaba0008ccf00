"""Training the two quality models from reference pages (Wikipedia, or pages it cites) and random pages.

- KenLM 5-gram on the reference pages: CCNet-normalised lines, SentencePiece-encoded (a model trained
  here on the same lines), counted by `lmplz`, compiled by `build_binary`. Scores text "like the
  references" with low perplexity.
- fastText linear classifier, labels `reference` / `random`, with a small `dim` and `bucket` so the
  model is ~1 MB rather than fastText's default ~800 MB.
"""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llama_jax.curate.errors import CurateError
from llama_jax.curate.models import kenlm_tool
from llama_jax.curate.normalize import normalized_lines


@dataclass(frozen=True)
class QualityModels:
    kenlm: Path
    sentencepiece: Path
    reference: Path


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


def classifier_line(text: str) -> str:
    """One document per line, as the filter sees it at run time (newlines read as spaces)."""
    return " ".join(text.split())


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


def train_quality_models(references: list[str], randoms: list[str], out_dir: str | Path, order: int = 5,
                         vocab_size: int = 4000, dim: int = 16, bucket: int = 10000) -> QualityModels:
    out_dir = Path(out_dir)
    kenlm_bin, sp_model = train_kenlm(references, out_dir, order, vocab_size)
    reference = train_reference_classifier(references, randoms, out_dir / "reference.ftz", dim, bucket)
    return QualityModels(kenlm_bin, sp_model, reference)
