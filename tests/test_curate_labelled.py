"""What the CommonCrawl stages keep of a labelled crawl, with the shipped JSONL CommonCrawl config (the
default stages and settings) and quality models trained here with the default `train-quality-models`
settings: recall of the pages to keep, one copy of each duplicate pair, and each kept page traceable to
its input. Also: a page's quality bucket does not depend on the pages curated with it.

The labels are the generator's plantings (`llama_jax/curate/labelled.py`), not the pipeline's numbers.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from llama_jax.curate import labelled
from llama_jax.curate.labelled import (FOOTER, keep_metrics, labelled_crawl, mixture_documents, page_url,
                                       write_crawl)

CONFIGS = Path(__file__).resolve().parent.parent / "llama_jax" / "configs" / "curate"


@pytest.fixture(scope="module")
def split_pages(english_pages):
    return labelled.split_pages(english_pages)


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory, split_pages):
    from llama_jax.curate.quality_models import train_quality_models

    references, random_pages, _ = split_pages
    randoms = [r["text"] for r in labelled_crawl(random_pages, seed=1, pairs=5)]
    return train_quality_models(references, randoms, tmp_path_factory.mktemp("labelled_models"))


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, split_pages, trained_models):
    """The shipped JSONL CommonCrawl config on the labelled crawl: returns (records, kept id -> text, mixture dir)."""
    from llama_jax.cli.curate import main

    records = labelled_crawl(split_pages[2], seed=0)
    root = tmp_path_factory.mktemp("labelled")
    write_crawl(records, root / "crawl")
    data = yaml.safe_load((CONFIGS / "commoncrawl_jsonl.yaml").read_text())
    data["sources"][0]["path"] = str(root / "crawl")
    data["output_dir"] = str(root / "out")
    data["models"] = {"kenlm": str(trained_models.kenlm), "sentencepiece": str(trained_models.sentencepiece),
                      "reference": str(trained_models.reference)}
    (root / "curate.yaml").write_text(yaml.safe_dump(data))
    assert main([str(root / "curate.yaml"), "progress=false", "executor.tasks=2", "executor.workers=1"]) == 0
    return records, mixture_documents(root / "out" / "mixture"), root / "out" / "mixture"


def test_labelled_crawl_keeps_the_good_pages_and_one_copy_of_each_pair(labelled_run):
    records, kept, _ = labelled_run
    metrics = keep_metrics(records, kept)
    assert metrics["recall"] >= 0.9, metrics
    assert metrics["precision"] >= 0.9, metrics
    assert metrics["pairs"]["exact"]["one"] == metrics["pairs"]["exact"]["pairs"] == 20, metrics
    assert metrics["pairs"]["near"]["one"] >= 0.9 * metrics["pairs"]["near"]["pairs"], metrics
    for label in ("gibberish", "non_english", "short"):
        assert metrics["labels"][label]["kept"] == 0, (label, metrics)
    assert metrics["footers_left"] <= 1, metrics  # line dedup leaves one copy of a repeated line


def test_kept_pages_carry_their_id_and_url_into_the_mixture(labelled_run):
    """Every shard line names the raw page it came from; the training reader still reads the shards."""
    from llama_jax.data.config import SourceConfig
    from llama_jax.data.sources import read_documents

    records, kept, mixture = labelled_run
    by_id = {r["id"]: r for r in records}
    lines = [json.loads(line) for p in sorted(mixture.glob("shard-*.jsonl")) for line in p.read_text().splitlines()]
    assert lines and all(line["id"] in by_id and line["url"] == page_url(line["id"]) for line in lines)
    for line in lines:  # the kept text is the raw page's, less any lines removed as repeats
        assert set(line["text"].split("\n")) <= set(by_id[line["id"]]["text"].split("\n"))
    assert sorted(read_documents(SourceConfig(kind="curated", path=str(mixture)))) == sorted(kept.values())


def test_keep_metrics_on_a_hand_counted_example():
    records = [{"id": "g1", "label": "good", "pair": "", "text": "a\n" + FOOTER[0]},
               {"id": "g2", "label": "good", "pair": "", "text": "b"},
               {"id": "e1", "label": "exact", "pair": "exact0", "text": "c"},
               {"id": "e2", "label": "exact", "pair": "exact0", "text": "c"},
               {"id": "n1", "label": "near", "pair": "near0", "text": "d"},
               {"id": "n2", "label": "near", "pair": "near0", "text": "d!"},
               {"id": "n3", "label": "near", "pair": "near1", "text": "e"},
               {"id": "n4", "label": "near", "pair": "near1", "text": "e!"},
               {"id": "s1", "label": "salad", "pair": "", "text": "f"}]
    kept = {"g1": "a\n" + FOOTER[0], "e1": "c", "n1": "d", "n2": "d!", "s1": "f"}
    metrics = keep_metrics(records, kept)
    assert metrics["labels"]["good"] == {"pages": 2, "kept": 1} and metrics["labels"]["near"] == {"pages": 4, "kept": 2}
    assert metrics["pairs"] == {"exact": {"pairs": 1, "one": 1, "both": 0, "none": 0},
                                "near": {"pairs": 2, "one": 0, "both": 1, "none": 1}}
    # wanted: g1, g2, exact0, near0, near1 = 5; recalled: g1, exact0, near0 = 3; kept pages: 5
    assert metrics["recall"] == pytest.approx(3 / 5) and metrics["precision"] == pytest.approx(3 / 5)
    assert metrics["footers_left"] == 1


def test_labelled_crawl_plants_what_it_says(split_pages):
    """Exact copies are identical and in other shards; near copies' word 5-grams are 0.7-0.95 similar."""
    records = labelled_crawl(split_pages[2], seed=0)
    pairs = {}
    for r in records:
        if r["pair"]:
            pairs.setdefault(r["pair"], []).append(r)

    def shingles(text):
        words = text.split()
        return {tuple(words[i:i + 5]) for i in range(len(words) - 4)}

    for name, (a, b) in pairs.items():
        if name.startswith("exact"):
            assert a["text"] == b["text"] and a["shard"] != b["shard"]
        else:
            sa, sb = shingles(a["text"]), shingles(b["text"])
            assert 0.7 <= len(sa & sb) / len(sa | sb) <= 0.95, name
    assert sum(FOOTER[1] in r["text"] for r in records if r["label"] == "good") >= 10


def _quality_buckets(tmp_path: Path, pages: list[str], models, extra: list[str] = ()) -> dict[str, tuple]:
    """page id -> (bucket, perplexity) for the pages the quality stage keeps, all buckets kept."""
    from llama_jax.curate.config import load_config
    from llama_jax.curate.run import execute

    (tmp_path / "in").mkdir(parents=True)
    (tmp_path / "in" / "pages.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n"
                                                         for i, t in enumerate(pages)))
    overrides = [f"output_dir={tmp_path / 'out'}", "progress=false", "mixture.enabled=false", "executor.workers=1",
                 f"models.kenlm={models.kenlm}", f"models.sentencepiece={models.sentencepiece}",
                 "quality.keep_buckets=[head, middle, tail]",
                 f"sources=[{{name: cc, format: jsonl, path: {tmp_path / 'in'}, stages: [quality]}}]", *extra]
    execute(load_config(None, overrides), report=lambda line: None)
    buckets = {}
    for shard in (tmp_path / "out" / "cc" / "01_quality").glob("*.jsonl.gz"):
        with gzip.open(shard, "rt") as fh:
            for line in fh:
                record = json.loads(line)
                buckets[record["text"]] = (record["metadata"]["bucket"], record["metadata"]["perplexity"])
    return buckets


def test_a_page_gets_the_same_bucket_alone_or_in_a_large_batch(tmp_path, english_pages, curate_models):
    """Fixed cutoffs: the page that scores worst among 80 clean pages gets the same bucket when curated
    alone (with corpus percentiles it would be head alone and tail in the batch)."""
    batch = _quality_buckets(tmp_path / "batch", english_pages[150:230], curate_models)
    worst = max(batch, key=lambda text: batch[text][1])
    alone = _quality_buckets(tmp_path / "alone", [worst], curate_models)
    assert alone == {worst: batch[worst]}
    cutoffs = json.loads(Path(curate_models.cutoffs).read_text())["cutoffs"]
    for bucket, perplexity in batch.values():
        assert bucket == ("head" if perplexity <= cutoffs[0] else "middle" if perplexity <= cutoffs[1] else "tail")


def test_explicit_cutoffs_and_corpus_percentiles(tmp_path, english_pages, curate_models):
    """`quality.cutoffs: [HEAD, MIDDLE]` buckets by those numbers; `quality.corpus_percentiles` by the
    run's own percentiles (30 pages: 10 per bucket at the tertiles)."""
    pages = english_pages[150:180]
    fixed = _quality_buckets(tmp_path / "fixed", pages, curate_models, ["quality.cutoffs=[100, 200]"])
    assert len(fixed) == 30
    for bucket, perplexity in fixed.values():
        assert bucket == ("head" if perplexity <= 100 else "middle" if perplexity <= 200 else "tail")
    corpus = _quality_buckets(tmp_path / "corpus", pages, curate_models, ["quality.corpus_percentiles=[33.4, 66.7]"])
    assert sorted(bucket for bucket, _ in corpus.values()) == ["head"] * 10 + ["middle"] * 10 + ["tail"] * 10


def _words(prefix: str, n: int) -> str:
    """n distinct words (letters only: line dedup folds digits to 0)."""
    return " ".join(prefix + "abcdefghij"[i // 10] + "abcdefghij"[i % 10] for i in range(n))


def test_line_dedup_drops_short_pages_and_pages_that_lost_most_of_their_text(tmp_path):
    """Pages that only lose a shared footer stay; a 20-word page goes (unchanged or not); a page whose
    known lines are most of it goes, though 55 words remain."""
    from llama_jax.curate.config import load_config
    from llama_jax.curate.run import execute

    footer = "Share this page | Print | Email"
    body = "\n".join(_words(f"l{'pqrs'[k]}w", 20) for k in range(4))
    pages = {"first": body + "\n" + footer, "other": _words("o", 80) + "\n" + footer, "short": _words("s", 20),
             "mostly_copy": body + "\n" + _words("n", 55)}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in pages.items()))
    overrides = [f"output_dir={tmp_path / 'out'}", "progress=false", "mixture.enabled=false", "executor.tasks=1",
                 "executor.workers=1", f"sources=[{{name: cc, format: jsonl, path: {tmp_path / 'in'}, stages: [line_dedup]}}]"]
    execute(load_config(None, overrides), report=lambda line: None)
    with gzip.open(tmp_path / "out" / "cc" / "01_line_dedup" / "00000.jsonl.gz", "rt") as fh:
        kept = {json.loads(line)["id"]: json.loads(line)["text"] for line in fh}
    assert kept == {"first": pages["first"], "other": _words("o", 80)}


def test_stage_outputs_are_gzip_at_level_one(labelled_run):
    """Every stage's shards are ordinary gzip written at level 1 (header XFL byte 4: fastest)."""
    _, _, mixture = labelled_run
    shards = sorted((mixture.parent / "commoncrawl").glob("*/*.jsonl.gz"))
    assert len(shards) == 12  # read and five stages, two tasks each
    for shard in shards:
        header = shard.read_bytes()[:10]
        assert header[:2] == b"\x1f\x8b" and header[8] == 4, shard
