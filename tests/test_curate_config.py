"""The curation config: shipped configs load, every mistake is one line naming the key (exit 2), and
fuzzing the config reader and the document readers finds only their own errors, never a crash."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import datatrove.executor.local  # noqa: F401  (its log sink binds the real stderr here, not a test's capture)
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_jax.cli.curate import main
from llama_jax.curate.config import STAGES, CurateConfig, load_config
from llama_jax.curate.errors import CurateError
from llama_jax.utils.config_io import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "llama_jax" / "configs" / "curate"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(str(CONFIGS / name), [])
    assert all(set(src.stages) <= set(STAGES) for src in cfg.sources)


def test_llama_config_mixes_the_papers_proportions():
    cfg = load_config(str(CONFIGS / "llama.yaml"), [])
    weights = {m.name: m.weight for m in cfg.mixture.sources}
    assert weights == {"commoncrawl": 0.67, "c4": 0.15, "github": 0.045, "wikipedia": 0.045, "books": 0.045,
                       "arxiv": 0.025, "stackexchange": 0.02}
    assert sorted(weights) == sorted(src.name for src in cfg.sources)


@pytest.mark.parametrize("overrides,message", [
    (["sources=[{name: cc, format: sample, stages: [dedupe]}]"],
     "sources[0]: stages[0]: unknown stage 'dedupe' (known: minhash, line_dedup, "),
    (["executor.kind=kubernetes"], "executor.kind: unknown executor 'kubernetes' (known: local, slurm, ray)"),
    (["sources=[{name: cc, format: warc, path: x}]"], "sources[0]: format: 'warc' is not one of"),
    (["sources=[{name: cc, format: jsonl}]"], "sources[0]: path: a jsonl source needs an input file"),
    (["minhash.n_gram=3"], "unknown key minhash.n_gram"),
    (["quality.corpus_percentiles=[50, 10]"], "quality.corpus_percentiles: two increasing numbers"),
    (["quality.cutoffs=[300, 200]"], "quality.cutoffs: two increasing positive perplexities"),
    (["quality.cutoffs=[100, .nan]"], "quality.cutoffs[1]: expected a finite number, got nan"),
    (["quality.cutoffs=[100, 200]", "quality.corpus_percentiles=[30, 60]"],
     "quality: give cutoffs or corpus_percentiles, not both"),
    (["line_dedup.min_kept_share=1.5"], "line_dedup.min_kept_share: must be in [0, 1]"),
    (["sources=[{name: cc, format: jsonl, path: x, stages: [quality]}]"],
     "models.kenlm: stage 'quality' of source 'cc' needs it"),
    (["mixture.sources=[{name: cc, weight: 0}]"], "mixture.sources[0](cc).weight: must be > 0"),
    (["executor.workers=0"], "executor: tasks and workers must be >= 1"),
])
def test_config_mistakes_are_one_line_naming_the_key(overrides, message, capsys):
    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_missing_config_file_and_model_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"error: config file not found: {tmp_path / 'nope.yaml'}\n"
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    args = [f"output_dir={tmp_path / 'out'}", "mixture.enabled=false",
            f"sources=[{{name: cc, format: jsonl, path: {tmp_path / 'in.jsonl'}, stages: [reference]}}]",
            f"models.reference={tmp_path / 'ref.ftz'}"]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: models.reference: model file {tmp_path / 'ref.ftz'} does not exist\n"


@pytest.mark.parametrize("content,why", [
    (b"", "empty"),
    (bytes(range(256)) * 8, "no line is a JSON object with text in 'text' (8 not UTF-8, 1 not JSON, 0 without text)"),
    (b'[1, 2]\n{"body": "x"}\n{oops\n', "no line is a JSON object with text in 'text' (0 not UTF-8, 1 not JSON, "
                                       "2 without text)"),
])
def test_input_without_documents_is_one_line_naming_it(tmp_path, capsys, content, why):
    """An empty or binary input file stops after reading it, naming the file and what was wrong (not the
    next stage's empty internal directory)."""
    (tmp_path / "c4.jsonl").write_bytes(content)
    args = [f"output_dir={tmp_path / 'out'}", "mixture.enabled=false", "progress=false",
            f"sources=[{{name: c4, format: jsonl, path: {tmp_path / 'c4.jsonl'}, stages: [c4_rules]}}]"]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: sources (c4).path: {tmp_path / 'c4.jsonl'}: no documents read: {why}\n"


def test_cutoffs_file_mistakes_are_one_line_naming_it(tmp_path, capsys):
    """The quality stage's fixed cutoffs come from cutoffs.json beside the KenLM model: a missing or
    malformed one is one line naming it, before any worker starts."""
    for name in ("kenlm.bin", "sp.model"):
        (tmp_path / name).write_bytes(b"x")
    args = [f"output_dir={tmp_path / 'out'}", "mixture.enabled=false", f"models.kenlm={tmp_path / 'kenlm.bin'}",
            f"models.sentencepiece={tmp_path / 'sp.model'}",
            f"sources=[{{name: cc, format: jsonl, path: {tmp_path}, stages: [quality]}}]"]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"error: models.cutoffs: perplexity cutoffs file "
                                              f"{tmp_path / 'cutoffs.json'} does not exist")
    (tmp_path / "cutoffs.json").write_text('{"cutoffs": [200, 100]}')
    assert main(args) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'cutoffs.json'}: cutoffs must be two increasing "
                                       f"positive perplexities, got [200, 100]\n")
    (tmp_path / "other.json").write_text('{"cutoffs": [1, 2, 3]}')  # models.cutoffs: read instead of the one beside
    assert main([*args, f"models.cutoffs={tmp_path / 'other.json'}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'other.json'}: not a cutoffs file")


@FUZZ
@given(data=st.binary(max_size=80) | st.recursive(
    st.none() | st.floats() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["cutoffs", "x"]), inner, max_size=2),
    max_leaves=6).map(lambda v: json.dumps(v).encode()))
def test_fuzz_cutoffs_file(tmp_path_factory, data):
    """Whatever cutoffs.json holds: two increasing positive finite numbers, or a CurateError naming it."""
    import math

    from llama_jax.curate.cutoffs import read_cutoffs

    path = tmp_path_factory.mktemp("cutoffs") / "cutoffs.json"
    path.write_bytes(data)
    try:
        head, middle = read_cutoffs(path)
    except CurateError as e:
        assert str(e).startswith(f"{path}: ")
    else:
        assert math.isfinite(middle) and 0 < head <= middle


def test_missing_input_names_the_source(tmp_path, capsys):
    args = [f"output_dir={tmp_path / 'out'}", f"sources=[{{name: web, format: jsonl, path: {tmp_path / 'raw'}, "
            "stages: [c4_rules]}]", "mixture.enabled=false"]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: sources (web).path: {tmp_path / 'raw'} does not exist\n"


# --- fuzz ------------------------------------------------------------------------------------------------

_YAMLISH = st.text(alphabet="abcdefgklmnoprstuwxy_:- [],{}\n#'\".0123456789=", max_size=160)


@FUZZ
@given(data=st.binary(max_size=200) | _YAMLISH)
def test_fuzz_curate_config_file(tmp_path_factory, data):
    """Whatever a curation config file holds, loading it validates or raises ConfigError."""
    path = tmp_path_factory.mktemp("fuzz") / "curate.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    try:
        assert isinstance(load_config(str(path), []), CurateConfig)
    except ConfigError:
        pass


_KEYS = st.sampled_from(["output_dir", "sources", "executor.kind", "executor.tasks", "stages", "models.kenlm",
                         "mixture.sources", "quality.corpus_percentiles", "quality.cutoffs", "book_dedup.threshold",
                         "language.languages", "line_dedup.min_kept_share",
                         "sources[0]", "mixture.shard_tokens", "sample_bytes"])
_VALUES = st.sampled_from(["1", "-1", "0.5", "x", "[]", "[1, 2]", "{}", "null", "true", "[{name: a}]",
                           "[{name: a, format: jsonl, path: p}]", "[{name: a, stages: [minhash, minhash]}]",
                           "nan", "inf", "ray", "slurm", "[head, bottom]", "{kind: x}"])


@FUZZ
@given(overrides=st.lists(st.tuples(_KEYS, _VALUES).map("=".join), max_size=4))
def test_fuzz_curate_config_overrides(overrides):
    try:
        assert isinstance(load_config(None, overrides), CurateConfig)
    except ConfigError:
        pass


def _reader_over(tmp_path: Path, payload: bytes, compress: bool):
    from llama_jax.curate.blocks.readers import SafeJsonlReader

    shard = tmp_path / ("shard.jsonl.gz" if compress else "shard.jsonl")
    shard.write_bytes(gzip.compress(payload) if compress else payload)
    return SafeJsonlReader(str(tmp_path), skipped_dir=str(tmp_path / "skipped"))


_LINE = st.one_of(st.binary(max_size=40),
                  st.builds(lambda t: json.dumps({"text": t}).encode(), st.text(max_size=20)),
                  st.builds(lambda v: json.dumps(v).encode(), st.integers() | st.lists(st.integers(), max_size=2)),
                  st.just(b'{"text": "caf\xe9"}'), st.just(b'{"text": ""}'), st.just(b'{"id": 1}'),
                  st.just(b'{"text": "a\\ud800b"}'), st.just(b'{"text": "\\udcff"}'),
                  st.just(b'{"text": "\\ud83d\\ude00"}'))


@FUZZ
@given(lines=st.lists(_LINE, max_size=8), compress=st.booleans())
def test_fuzz_jsonl_shard_reader(tmp_path_factory, lines, compress):
    """Any line of a shard is a document or a counted skip; the two always add up to the lines."""
    from llama_jax.curate.blocks.tally import read_tally

    tmp_path = tmp_path_factory.mktemp("shard")
    payload = b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines)
    reader = _reader_over(tmp_path, payload, compress)
    docs = list(reader.run())
    skipped = read_tally(tmp_path / "skipped")
    nonblank = [line for line in payload.split(b"\n") if line.strip()]
    assert len(docs) + sum(skipped.values()) == len(nonblank)
    assert all(isinstance(d.text, str) and d.text and d.text.encode("utf-8") for d in docs)  # Unicode text


def test_reader_counts_non_utf8_and_names_a_corrupt_shard(tmp_path):
    from llama_jax.curate.blocks.tally import read_tally

    payload = (b'{"text": "good"}\n{"text": "caf\xe9"}\n{not json\n{"body": "x"}\n'
               b'{"text": "lone \\udcff here"}\n{"text": "pair \\ud83d\\ude00"}\n')
    docs = list(_reader_over(tmp_path, payload, compress=False).run())
    assert [d.text for d in docs] == ["good", "pair \U0001F600"]  # an escaped pair is one character
    assert read_tally(tmp_path / "skipped") == {"not_utf8": 2, "bad_json": 1, "no_text": 1}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    from llama_jax.curate.blocks.readers import SafeJsonlReader

    with pytest.raises(CurateError, match=rf"^{bad / 'x.jsonl.gz'}: unreadable shard"):
        list(SafeJsonlReader(str(bad), skipped_dir=str(tmp_path / "s2")).run())


@FUZZ
@given(data=st.binary(max_size=300) | st.text(alphabet="<>/=\"' rowpstIdPTypeScoreBdyParentl12&;", max_size=200)
       .map(lambda t: ("<posts>" + t).encode()))
def test_fuzz_stackexchange_posts(data):
    from llama_jax.curate.blocks.stackexchange import parse_posts

    try:
        records, orphans = parse_posts(io.BytesIO(data), "Posts.xml")
    except CurateError as e:
        assert str(e).startswith("Posts.xml: ")
    else:
        assert orphans >= 0 and all(r["text"] for r in records)


@FUZZ
@given(data=st.binary(max_size=300) | st.text(alphabet="<>/ pagetitlnsidrevxo0[]{}|'=", max_size=200)
       .map(lambda t: ("<mediawiki><page>" + t).encode()))
def test_fuzz_wikipedia_dump(data):
    from llama_jax.curate.blocks.wikipedia import parse_dump

    try:
        pages = list(parse_dump(io.BytesIO(data), "dump.xml"))
    except CurateError as e:
        assert str(e).startswith("dump.xml: ")
    else:
        assert all(isinstance(text, str) for _, _, text in pages)


@FUZZ
@given(manifest=st.recursive(st.none() | st.integers() | st.text(max_size=8),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                 st.sampled_from(["format", "shards", "file", "tokens"]), inner, max_size=3),
                             max_leaves=8))
def test_fuzz_curated_manifest(tmp_path_factory, manifest):
    """The training side's reader of a mixture manifest: shards or a ValueError/FileNotFoundError."""
    from llama_jax.data.curated import FORMAT, MANIFEST, curated_shards

    directory = tmp_path_factory.mktemp("mix")
    if isinstance(manifest, dict) and "format" in manifest:
        manifest["format"] = FORMAT
    (directory / MANIFEST).write_text(json.dumps(manifest))
    try:
        shards = curated_shards(directory)
    except (ValueError, FileNotFoundError):
        pass
    else:
        assert shards and all(Path(s).is_file() for s in shards)


@pytest.mark.parametrize("workers", [1, 2])
def test_run_with_an_unreadable_shard_is_one_line_naming_it(tmp_path, capsys, workers):
    """A truncated gzip shard stops the run inside the worker; the command still ends with one line
    naming the file (exit 2), not a traceback."""
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (crawl / "a.jsonl").write_text('{"text": "fine page"}\n')
    (crawl / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a page"}\n' * 200)[:60])
    args = [f"output_dir={tmp_path / 'out'}", "mixture.enabled=false", "progress=false", f"executor.workers={workers}",
            f"sources=[{{name: cc, format: jsonl, path: {crawl}, stages: [c4_rules]}}]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {crawl / 'b.jsonl.gz'}: unreadable shard") and err.count("\n") == 1, err
