"""Whole curation runs on small planted crawls: what each stage removes, the funnel, the same output with
1 and 2 workers and after a kill and relaunch, Slurm's generated scripts, a local Ray cluster, and
training reading the mixture.

The crawl is English pages (stdlib docstrings), pages in other languages, shuffled-word pages, a
boilerplate line repeated across shards, and non-UTF-8 / non-JSON lines; a second source is a small
Wikipedia dump. The expectations are those plantings, not the pipeline's own numbers.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import NON_ENGLISH_PAGES
from llama_jax.curate.config import load_config
from llama_jax.curate.mixture import count_tokens

BOILERPLATE = "Sign up for our weekly digest | Terms of service | Contact us"
SHARDS = 3


def _shuffled(page: str, rng: random.Random) -> str:
    words = page.split()
    rng.shuffle(words)
    return "\n".join(" ".join(words[i:i + 15]) for i in range(0, len(words), 15))


def write_crawl(directory: Path, english: list[str]) -> dict[str, list[str]]:
    """Three gzipped JSONL shards; returns the planted ids by kind."""
    rng = random.Random(5)
    records, kinds = [], {"english": [], "other_language": [], "shuffled": []}
    for i, page in enumerate(english):
        lines = page.split("\n")
        if i % 2 == 0:
            lines.insert(0, BOILERPLATE)
        records.append({"id": f"en{i}", "text": "\n".join(lines)})
        kinds["english"].append(f"en{i}")
    for lang, text in NON_ENGLISH_PAGES.items():
        records.append({"id": lang, "text": text})
        kinds["other_language"].append(lang)
    for i, page in enumerate(english[:6]):
        records.append({"id": f"shuffled{i}", "text": _shuffled(page, rng)})
        kinds["shuffled"].append(f"shuffled{i}")
    rng.shuffle(records)
    directory.mkdir(parents=True)
    for shard in range(SHARDS):
        lines = [json.dumps(r, ensure_ascii=False).encode() for r in records[shard::SHARDS]]
        lines.insert(1, b'{"id": "latin1", "text": "caf\xe9 cr\xe8me"}')  # not UTF-8: counted, skipped
        lines.insert(2, b'{"id": "broken", "text": ')  # not JSON
        (directory / f"crawl-{shard}.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return kinds


WIKI_PAGE = ("<page><title>{title}</title><ns>0</ns><id>{id}</id><revision><text>'''{title}''' is a "
             "[[town|small town]] in the north.{{{{citation needed}}}} It has {n} bridges and a "
             "[[market]].\n== History ==\nThe town was founded long ago.</text></revision></page>")


def write_wikipedia(directory: Path) -> None:
    directory.mkdir(parents=True)
    pages = "".join(WIKI_PAGE.format(title=f"Town{i}", id=i, n=i) for i in range(60))
    (directory / "dump.xml").write_text(f"<mediawiki>{pages}</mediawiki>")


@pytest.fixture(scope="module")
def raw(tmp_path_factory, english_pages):
    root = tmp_path_factory.mktemp("raw")
    kinds = write_crawl(root / "crawl", english_pages[150:200])
    write_wikipedia(root / "wiki")
    return root, kinds


def config_file(path: Path, raw_root: Path, models, output: Path, workers: int, **extra) -> Path:
    data = {
        "output_dir": str(output), "progress": True,
        "models": {"kenlm": str(models.kenlm), "sentencepiece": str(models.sentencepiece),
                   "reference": str(models.reference)},
        "sources": [{"name": "cc", "format": "jsonl", "path": str(raw_root / "crawl"),
                     "stages": ["line_dedup", "language", "quality", "reference", "minhash"]},
                    {"name": "wiki", "format": "wikipedia_xml", "path": str(raw_root / "wiki"), "stages": []}],
        "mixture": {"sources": [{"name": "cc", "weight": 0.8, "epochs": 1.0},
                                {"name": "wiki", "weight": 0.2, "epochs": 3.0}], "shard_tokens": 5000},
        "executor": {"kind": "local", "tasks": 2, "workers": workers},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def stage_docs(root: Path, source: str, tag: str) -> dict[str, str]:
    """id -> text of the documents a stage wrote."""
    docs = {}
    for shard in sorted((root / source / tag).glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                docs[record["id"]] = record["text"]
    return docs


def mixture_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "mixture").iterdir())}


def run_cli(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_jax.curate", str(config), *overrides],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, raw, curate_models):
    """The reference run: 2 workers, through the command line."""
    raw_root, kinds = raw
    out = tmp_path_factory.mktemp("run2")
    config = config_file(out / "curate.yaml", raw_root, curate_models, out / "out", workers=2)
    result = run_cli(config)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "out", kinds, result.stdout


def test_each_stage_removes_what_was_planted(two_worker_run):
    root, kinds, stdout = two_worker_run
    read = stage_docs(root, "cc", "00_read")
    assert set(read) == {i for ids in kinds.values() for i in ids}  # the two bad lines per shard: skipped
    assert sum(BOILERPLATE in text for text in read.values()) == 25
    dedup = stage_docs(root, "cc", "01_line_dedup")
    assert sum(BOILERPLATE in text for text in dedup.values()) == 1  # one copy of a repeated line survives
    language = stage_docs(root, "cc", "02_language")
    assert not set(kinds["other_language"]) & set(language)
    assert set(kinds["english"]) & set(dedup) <= set(language)
    quality = stage_docs(root, "cc", "03_quality")
    assert set(kinds["shuffled"]) & set(language) and not set(kinds["shuffled"]) & set(quality)
    assert {json.loads(gzip.open(p).readline())["metadata"]["bucket"]
            for p in (root / "cc" / "03_quality").glob("*.gz")} <= {"head", "middle"}

    funnel = json.loads((root / "funnel.json").read_text())
    rows = {(r["source"], r["stage"]): r for r in funnel}
    assert [s for src, s in rows if src == "cc"] == ["read", "line_dedup", "language", "quality", "reference",
                                                     "minhash"]
    assert rows["cc", "read"]["skipped"] == 2 * SHARDS
    assert rows["cc", "language"]["docs_in"] == len(dedup) and rows["cc", "language"]["docs_out"] == len(language)
    assert rows["cc", "line_dedup"]["bytes_out"] < rows["cc", "line_dedup"]["bytes_in"]
    assert rows["wiki", "read"]["docs_out"] == 60
    assert "funnel:" in stdout and "kept" in stdout and "(6 bad lines skipped)" in stdout


def test_mixture_follows_the_weights_and_wikipedia_markup_is_gone(two_worker_run):
    root, _, _ = two_worker_run
    manifest = json.loads((root / "mixture" / "manifest.json").read_text())
    tokens = {"cc": 0, "wiki": 0}
    for entry in manifest["shards"]:
        for line in (root / "mixture" / entry["file"]).read_text().splitlines():
            record = json.loads(line)
            tokens[record["source"]] += count_tokens(record["text"])
            assert "[[" not in record["text"] and "{{" not in record["text"]
    share = tokens["wiki"] / sum(tokens.values())
    assert abs(share - 0.2) < 0.01, tokens
    assert manifest["sources"]["wiki"]["epochs"] > 1  # the small source is repeated, within its 3 epochs


def test_one_worker_gives_the_same_output(tmp_path, raw, curate_models, two_worker_run):
    """Workers change only how many tasks run at once: every stage's output is byte-identical."""
    from llama_jax.curate.run import execute

    root2, _, _ = two_worker_run
    config = config_file(tmp_path / "c.yaml", raw[0], curate_models, tmp_path / "out", workers=1)
    execute(load_config(str(config), ["progress=false"]), report=lambda line: None)
    root1 = tmp_path / "out"
    assert mixture_bytes(root1) == mixture_bytes(root2)
    for tag in ("01_line_dedup", "03_quality", "05_minhash"):
        assert stage_docs(root1, "cc", tag) == stage_docs(root2, "cc", tag)


def test_killed_run_relaunched_ends_with_the_same_output(tmp_path, raw, curate_models, two_worker_run):
    """SIGKILL the whole run once the line-dedup stage has finished, relaunch: the finished phases are
    skipped (their outputs untouched) and the result equals the uninterrupted run's."""
    root2, _, _ = two_worker_run
    out = tmp_path / "out"
    config = config_file(tmp_path / "c.yaml", raw[0], curate_models, out, workers=1)
    proc = subprocess.Popen([sys.executable, "-m", "llama_jax.curate", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "logs" / "cc" / "02_language.filter" / "completions"
    deadline = time.monotonic() + 300
    while not (marker.is_dir() and any(marker.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "funnel.json").exists(), "the run ended before it could be killed"
    finished = out / "cc" / "01_line_dedup"
    before = {p.name: p.stat().st_mtime_ns for p in finished.glob("*.gz")}
    result = run_cli(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in finished.glob("*.gz")} == before
    assert mixture_bytes(out) == mixture_bytes(root2)
    assert json.loads((out / "funnel.json").read_text()) == json.loads((root2 / "funnel.json").read_text())


def test_training_reads_the_curated_mixture(two_worker_run, stdlib_tokenizer):
    """`train.py data.sources=[{kind: curated, path: OUT/mixture}]`: the training config takes it and the
    training iterator's batches are made of the mixture's documents."""
    from llama_jax.data.config import DataConfig, SourceConfig
    from llama_jax.data.pipeline import make_train_iterator
    from llama_jax.data.sources import read_documents
    from llama_jax.training.config import load_train_config

    root, _, _ = two_worker_run
    train_cfg = load_train_config(None, [f"data.sources=[{{kind: curated, path: {root / 'mixture'}}}]"])
    source = train_cfg.data.sources[0]
    assert source == SourceConfig(kind="curated", path=str(root / "mixture"))
    docs = read_documents(source)
    shard_texts = [json.loads(line)["text"] for p in sorted((root / "mixture").glob("shard-*.jsonl"))
                   for line in p.read_text().splitlines()]
    assert docs == shard_texts
    iterator = make_train_iterator(DataConfig(sources=[source], validation_sources=[]), stdlib_tokenizer,
                                   seq_len=32, global_batch_size=2)
    batch = next(iterator)
    assert batch["inputs"].shape == (2, 32)
    text = stdlib_tokenizer.decode([int(t) for t in batch["inputs"][0] if t > 2])
    assert any(text[:20] in doc for doc in docs)


def test_wet_files_are_read(tmp_path):
    """A CommonCrawl WET file (text/plain conversion records, as warcio writes them) read into documents
    with their URLs; request records are ignored."""
    from io import BytesIO

    from warcio.warcwriter import WARCWriter

    from llama_jax.curate.run import execute

    pages = {f"https://example.org/{i}": f"Page {i} says something useful about topic {i}." for i in range(5)}
    (tmp_path / "wet").mkdir()
    with open(tmp_path / "wet" / "part.warc.wet.gz", "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for url, text in pages.items():
            writer.write_record(writer.create_warc_record(url, "conversion", payload=BytesIO(text.encode()),
                                                          warc_content_type="text/plain"))
        writer.write_record(writer.create_warc_record("https://example.org/x", "request", payload=BytesIO(b"GET /")))
    overrides = [f"output_dir={tmp_path / 'out'}", "progress=false", "executor.workers=1", "executor.tasks=1",
                 f"sources=[{{name: cc, format: wet, path: {tmp_path / 'wet'}, stages: []}}]",
                 "mixture.sources=[{name: cc, weight: 1}]"]
    execute(load_config(None, overrides), report=lambda line: None)
    with gzip.open(tmp_path / "out" / "cc" / "00_read" / "00000.jsonl.gz", "rt") as fh:
        records = [json.loads(line) for line in fh]
    assert {r["metadata"]["url"]: r["text"] for r in records} == pages
