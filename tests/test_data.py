"""The data pipeline: packing, shuffling, mixtures, resumption, per-host sharding, evaluation bytes, bad input.

Oracles: a naive token-by-token packer written here (stream of BOS doc EOS, cut into overlapping rows),
the tokenizer applied to each document directly, an uninterrupted iterator (resumption), the
single-process iterator (sharding) and the raw validation text (bytes).
"""
from __future__ import annotations

import collections
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from fuzzing import JSON_VALUES, fast_and_slow
from llama_jax.utils.config_io import ConfigError
from llama_jax.data import DataConfig, SourceConfig, make_eval_batches, make_train_iterator, validation_text
from llama_jax.data import corpus
from llama_jax.data.sources import read_documents

SEQ = 16
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="module")
def tok(stdlib_tokenizer):
    return stdlib_tokenizer


def make_docs(directory: Path, lengths: list[int], stem: str = "doc") -> list[str]:
    """Text files of varied lengths (some shorter than a row, some spanning several rows)."""
    directory.mkdir(parents=True, exist_ok=True)
    source = (corpus.stdlib_root() / "bisect.py").read_text(encoding="utf-8")
    texts = []
    for i, n in enumerate(lengths):
        text = source[i * 37:i * 37 + n] + f" ü{i}"
        (directory / f"{stem}{i:02d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


LENGTHS = [5, 60, 3, 140, 9, 33, 1, 250, 17, 70, 12]


@pytest.fixture()
def text_dir(tmp_path) -> tuple[Path, list[str]]:
    texts = make_docs(tmp_path / "text", LENGTHS)
    return tmp_path / "text", texts


def naive_rows(docs: list[list[int]], seq_len: int, tok, doc_bytes: list[list[int]] | None = None) -> list[dict]:
    """Independent reference packer: build the stream token by token, then slice overlapping rows.

    With `doc_bytes` (bytes per content token), each row also gets num_bytes: the bytes of its counted
    targets."""
    stream, owner, nbytes = [], [], []
    for d, ids in enumerate(docs):
        counts = doc_bytes[d] if doc_bytes else [0] * len(ids)
        for t, n in zip([tok.bos_id, *ids, tok.eos_id], [0, *counts, 0]):
            stream.append(t)
            owner.append(d)
            nbytes.append(n)
    rows = []
    for start in range(0, len(stream) - 1, seq_len):
        toks = stream[start:start + seq_len + 1]
        own = owner[start:start + seq_len + 1]
        row_bytes = nbytes[start + 1:start + seq_len + 1]
        toks += [tok.pad_id] * (seq_len + 1 - len(toks))
        own += [None] * (seq_len + 1 - len(own))
        seg, pos, ids_seen = [], [], []
        for j, o in enumerate(own):
            if o is None:
                seg.append(0)
                pos.append(0)
                continue
            if not ids_seen or ids_seen[-1] != o:
                ids_seen.append(o)
                start_j = j
            seg.append(len(ids_seen))
            pos.append(j - start_j)
        mask = [float(own[j] is not None and own[j] == own[j + 1]) for j in range(seq_len)]
        rows.append({"inputs": toks[:-1], "targets": toks[1:], "segment_ids": seg[:-1], "positions": pos[:-1],
                     "loss_mask": mask, "num_bytes": sum(n for n, m in zip(row_bytes, mask) if m)})
    return rows


def take(it, n):
    return [next(it) for _ in range(n)]


def rows_of(batches):
    return [{k: b[k][i] for k in KEYS} for b in batches for i in range(len(b["inputs"]))]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def text_cfg(path, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(kind="text", path=str(path))], validation_sources=[], **kw)


def test_packing_matches_the_naive_packer(text_dir, tok):
    path, texts = text_dir
    expected = naive_rows([tok.encode(t, bos=False) for t in texts], SEQ, tok)
    it = make_train_iterator(text_cfg(path, shuffle=False), tok, seq_len=SEQ, global_batch_size=3)
    got = rows_of(take(it, -(-2 * len(expected) // 3)))  # two epochs: the unshuffled order repeats
    batch = next(it)
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "inputs": (np.int32, (3, SEQ)), "targets": (np.int32, (3, SEQ)), "segment_ids": (np.int32, (3, SEQ)),
        "positions": (np.int32, (3, SEQ)), "loss_mask": (np.float32, (3, SEQ))}
    for r, row in enumerate(got):
        want = expected[r % len(expected)]
        for k in KEYS:
            np.testing.assert_array_equal(row[k], np.asarray(want[k], row[k].dtype), err_msg=f"row {r} {k}")
    assert expected[-1]["segment_ids"][-1] == 0  # the epoch's last row is padded...
    assert got[len(expected) - 1]["loss_mask"][-1] == 0  # ...and its padding is out of the loss


def test_a_shuffled_epoch_holds_every_token_once(text_dir, tok):
    path, texts = text_dir
    docs = [tok.encode(t, bos=True, eos=True) for t in texts]
    num_rows = len(naive_rows([d[1:-1] for d in docs], SEQ, tok))
    it = make_train_iterator(text_cfg(path, seed=3), tok, seq_len=SEQ, global_batch_size=1)
    expected_targets = collections.Counter(t for d in docs for t in d[1:])  # content tokens and EOS
    epochs = []
    for _ in range(2):
        rows = rows_of(take(it, num_rows))
        targets = collections.Counter(int(t) for r in rows for t, m in zip(r["targets"], r["loss_mask"]) if m)
        assert targets == expected_targets
        for r in rows:  # each segment is a contiguous piece of one document, positions from 0
            tokens = np.append(r["inputs"], r["targets"][-1])
            for s in set(r["segment_ids"]) - {0}:
                where = np.flatnonzero(r["segment_ids"] == s)
                assert list(where) == list(range(where[0], where[-1] + 1))
                np.testing.assert_array_equal(r["positions"][where], np.arange(len(where)))
                piece = list(tokens[where[0]:where[-1] + 2 if r["loss_mask"][where[-1]] else where[-1] + 1])
                assert any(piece == d[i:i + len(piece)] for d in docs for i in range(len(d)))
        epochs.append([r["inputs"].tolist() for r in rows])
    unshuffled = naive_rows([d[1:-1] for d in docs], SEQ, tok)
    assert epochs[0] != [r["inputs"] for r in unshuffled]  # shuffled...
    assert epochs[0] != epochs[1]  # ...and reshuffled every epoch
    other = make_train_iterator(text_cfg(path, seed=4), tok, seq_len=SEQ, global_batch_size=1)
    assert [r["inputs"].tolist() for r in rows_of(take(other, num_rows))] != epochs[0]


def mixture_cfg(tmp_path, **kw) -> DataConfig:
    make_docs(tmp_path / "a", LENGTHS)
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(make_docs(tmp_path / "b_src", [40, 8, 90, 3]))]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DataConfig(sources=[SourceConfig(kind="text", path=str(tmp_path / "a" / "*.txt"), weight=3.0),
                               SourceConfig(kind="jsonl", path=str(tmp_path / "b.jsonl"), text_field="body")],
                      validation_sources=[], seed=11, **kw)


def test_resumed_iterator_continues_exactly(tmp_path, tok):
    cfg = mixture_cfg(tmp_path)
    reference = take(make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=4), 30)
    it = make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=4)
    assert_batches_equal(take(it, 12), reference[:12])
    state = json.loads(json.dumps(it.get_state()))
    assert len(json.dumps(state)) < 200
    fresh = make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=4)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 18), reference[12:])  # crosses several epochs of both sources
    with pytest.raises(ValueError, match="state has seq_len=16, this iterator has 8"):
        make_train_iterator(cfg, tok, seq_len=8, global_batch_size=4).set_state(state)


def test_hosts_read_disjoint_halves_of_the_global_batch(tmp_path, tok):
    cfg = mixture_cfg(tmp_path)
    single = take(make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=6), 10)
    hosts = [take(make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=6, process_index=p,
                                      process_count=2), 10) for p in range(2)]
    for b, whole in enumerate(single):
        assert hosts[0][b]["inputs"].shape == (3, SEQ)
        joined = {k: np.concatenate([hosts[0][b][k], hosts[1][b][k]]) for k in KEYS}
        assert_batches_equal([joined], [whole])


def test_mixture_follows_the_weights(tmp_path, tok):
    it = make_train_iterator(mixture_cfg(tmp_path), tok, seq_len=SEQ, global_batch_size=8)
    take(it, 100)
    rows_a, rows_b = it.get_state()["source_rows"]
    assert rows_a + rows_b == 800
    # Binomial(800, 0.75): standard deviation 12.2 rows; allow 4 of them.
    assert abs(rows_a - 600) <= 49


def test_token_cache_gives_the_same_batches(tmp_path, text_dir, tok):
    path, _ = text_dir
    plain = take(make_train_iterator(text_cfg(path), tok, seq_len=SEQ, global_batch_size=2), 5)
    cached_cfg = text_cfg(path, cache_dir=str(tmp_path / "cache"))
    first = take(make_train_iterator(cached_cfg, tok, seq_len=SEQ, global_batch_size=2), 5)
    (cache_file,) = (tmp_path / "cache").glob("tokens-*.npz")
    second = take(make_train_iterator(cached_cfg, tok, seq_len=SEQ, global_batch_size=2), 5)
    assert_batches_equal(first, plain)
    assert_batches_equal(second, plain)
    (path / "doc00.txt").write_text("changed text", encoding="utf-8")  # new contents, new cache entry
    take(make_train_iterator(cached_cfg, tok, seq_len=SEQ, global_batch_size=2), 1)
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 2


def test_eval_pass_counts_every_validation_byte(tmp_path, tok):
    texts = make_docs(tmp_path / "val", LENGTHS[:7])
    cfg = DataConfig(validation_sources=[SourceConfig(kind="text", path=str(tmp_path / "val")),
                                         SourceConfig(kind="builtin", split="validation")])
    raw = validation_text(cfg)
    builtin = [f.read_bytes() for f in corpus.builtin_files("validation") if f.stat().st_size]
    assert raw == b"".join(t.encode("utf-8") for t in texts) + b"".join(builtin)
    batches = list(make_eval_batches(cfg, tok, seq_len=64, batch_size=4))
    assert sum(int(b["num_bytes"].sum()) for b in batches) == len(raw)
    encoded = [tok.encode_with_byte_counts(t) for t in texts + [f.decode("utf-8") for f in builtin]]
    naive = naive_rows([ids for ids, _ in encoded], 64, tok, [list(c) for _, c in encoded])
    assert len(batches) == -(-len(naive) // 4)
    got = rows_of(batches)
    num_bytes = np.concatenate([b["num_bytes"] for b in batches])
    for r, want in enumerate(naive):
        for k in KEYS:
            np.testing.assert_array_equal(got[r][k], np.asarray(want[k], got[r][k].dtype), err_msg=f"row {r} {k}")
        assert num_bytes[r] == want["num_bytes"], r
    assert all(row["loss_mask"].sum() == 0 for row in got[len(naive):])  # filler rows of the last batch
    halves = [list(make_eval_batches(cfg, tok, seq_len=64, batch_size=4, process_index=p, process_count=2,
                                     max_batches=3)) for p in range(2)]
    assert len(halves[0]) == 3
    for b in range(3):
        for k in (*KEYS, "num_bytes"):
            np.testing.assert_array_equal(np.concatenate([halves[0][b][k], halves[1][b][k]]), batches[b][k])


def test_builtin_corpus_split(tmp_path):
    train, val = corpus.builtin_files("train"), corpus.builtin_files("validation")
    root = corpus.stdlib_root()
    assert not set(train) & set(val)
    everything = sorted(p for p in root.rglob("*.py")
                        if not {"site-packages", "dist-packages", "test", "tests", "idle_test"}
                        & set(p.relative_to(root).parts))
    assert sorted(train + val) == everything
    assert 0.005 < len(val) / len(everything) < 0.05
    assert train == sorted(train, key=lambda p: p.relative_to(root).as_posix())
    assert corpus.builtin_files("validation") == val  # deterministic
    assert read_documents(SourceConfig(kind="builtin", split="validation")) == [
        p.read_text(encoding="utf-8") for p in val if p.stat().st_size]  # empty files are no documents


def test_default_config_is_the_builtin_corpus():
    cfg = DataConfig()
    assert [(s.kind, s.split) for s in cfg.sources] == [("builtin", "train")]
    assert [(s.kind, s.split) for s in cfg.validation_sources] == [("builtin", "validation")]


def test_pipeline_runs_without_grain_or_tfds(text_dir):
    path, _ = text_dir
    code = ("import sys; from llama_jax.data.tokenizer import load_tokenizer, train_sentencepiece;"
            "from llama_jax.data import DataConfig, SourceConfig, make_train_iterator;"
            f"cfg = DataConfig(sources=[SourceConfig(kind='text', path={str(path)!r})]);"
            f"tok = load_tokenizer(train_sentencepiece([{str(path / 'doc07.txt')!r}] * 20, 300, "
            f"{str(path.parent / 'sub')!r}));"
            "next(make_train_iterator(cfg, tok, seq_len=8, global_batch_size=2));"
            "bad = {'grain', 'tensorflow_datasets', 'tensorflow'} & set(sys.modules); assert not bad, bad")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- bad input

def test_missing_paths_and_empty_corpora(tmp_path, tok):
    def build(path, kind="text"):
        cfg = DataConfig(sources=[SourceConfig(kind=kind, path=str(path))])
        return make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=2)

    with pytest.raises(FileNotFoundError, match=r"source path \(text:.*nowhere\): .*nowhere does not exist"):
        build(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"glob '.*\*.txt' matches no files"):
        build(tmp_path / "*.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="directory .*empty_dir holds no files"):
        build(tmp_path / "empty_dir")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty corpus: source text:.*blank has no non-empty documents"):
        build(tmp_path / "blank")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8 text"):
        build(tmp_path / "latin1.txt")


def test_bad_jsonl_lines(tmp_path, tok, caplog):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "good one"}\n{"text": "fine"\n{"other": 1}\n\n[1, 2]\n{"text": "last"}\n')

    def docs(skip):
        return read_documents(SourceConfig(kind="jsonl", path=str(f), skip_bad_lines=skip))

    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON .*set skip_bad_lines"):
        docs(False)
    f.write_text('{"text": "good one"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: no string field 'text' \(keys: \['other'\]\)"):
        docs(False)
    f.write_text('{"text": "good one"}\n{"text": "caf\\u00e9 \\ud83d\\ude00 \\udcff"}\n')  # a pair is fine, a lone one not
    with pytest.raises(ValueError, match=r"d.jsonl:2: text: a lone surrogate U\+DCFF at character 7 \(not Unicode "
                                         r"text\); set skip_bad_lines"):
        docs(False)
    assert docs(True) == ["good one"]
    f.write_text('{"text": "one\u2028two\x85three\\rfour"}\n', newline="")  # raw in a JSON string: one record
    assert docs(False) == ["one\u2028two\x85three\rfour"]
    f.write_text('{"text": "good one"}\n' + "[" * 100000 + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON \(nested too deeply\)"):
        docs(False)
    f.write_text('{"text": "good one"}\n{"text": "fine"\n{"other": 1}\n\n[1, 2]\n{"text": "last"}\n')
    with caplog.at_level(logging.WARNING):
        assert docs(True) == ["good one", "last"]
    assert "skipped 3 bad line(s) in" in caplog.text and "d.jsonl:2: not valid JSON" in caplog.text


# text around a lone surrogate (valid JSON: "\udcff"), an escaped pair (a real character) or a raw line
# separator other than "\n" (valid inside a JSON string)
_TEXT = st.text(max_size=4) | st.tuples(st.text(max_size=2), st.sampled_from(
    ["\udcff", "\ud83d\ude00", "\u2028", "\x85", "\r", "\x0b"])).map("".join)
_LINE = (st.fixed_dictionaries({"text": _TEXT | JSON_VALUES}, optional={"id": JSON_VALUES}).map(
    lambda r: json.dumps(r, ensure_ascii=False)) | JSON_VALUES.map(json.dumps) | _TEXT)


def _jsonl_lines(tmp_path, lines):
    """Fuzz: whatever the lines, the JSONL reader returns the text of exactly the good lines (objects whose
    `text` is a string with a UTF-8 form), or a ValueError naming the first bad line; `skip_bad_lines` keeps
    the good ones. The oracle is the same rule applied line by line with the standard library."""
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8",
                    errors="surrogatepass")  # a raw surrogate in the file: not UTF-8, named as such
    good, first_bad = [], None
    for number, line in enumerate(path.read_bytes().split(b"\n")[:-1], start=1):
        try:
            record = json.loads(line.decode("utf-8"))
            record["text"].encode("utf-8")
            assert isinstance(record, dict) and isinstance(record["text"], str)
        except UnicodeDecodeError:
            good, first_bad = None, 0
            break
        except Exception:  # noqa: BLE001 (the oracle: any failure makes the line bad, unless it is blank)
            if line.decode("utf-8").strip():
                first_bad = first_bad or number
            continue
        good.append(record["text"])
    for skip in (False, True):
        try:
            docs = read_documents(SourceConfig(kind="jsonl", path=str(path), skip_bad_lines=skip))
        except ValueError as e:
            if good is None:
                assert str(e).startswith(f"{path}: not UTF-8 text")
            elif not [d for d in good if d]:
                assert skip or str(e).startswith(f"{path}:{first_bad}: ") or str(e).startswith("empty corpus")
            else:
                assert not skip and str(e).startswith(f"{path}:{first_bad}: ") and "\n" not in str(e), e
            continue
        assert good is not None and (skip or first_bad is None) and docs == [d for d in good if d]


test_fuzz_jsonl_lines, test_fuzz_jsonl_lines_many = fast_and_slow(_jsonl_lines, lines=st.lists(_LINE, max_size=4))


def test_bad_config_values():
    with pytest.raises(ConfigError, match="source kind: 'csv' is not one of"):
        SourceConfig(kind="csv")
    with pytest.raises(ConfigError, match="source path: a jsonl source needs"):
        SourceConfig(kind="jsonl")
    with pytest.raises(ConfigError, match="source name: a tfds source needs a dataset name"):
        SourceConfig(kind="tfds")
    with pytest.raises(ConfigError, match="source weight: must be a finite number > 0, got -1"):
        SourceConfig(kind="builtin", weight=-1.0)
    with pytest.raises(ConfigError, match="split: the builtin corpus has splits"):
        SourceConfig(kind="builtin", split="test")
    with pytest.raises(ConfigError, match="data.sources: at least one training source"):
        DataConfig(sources=[])
    with pytest.raises(ConfigError, match=r"data.validation_sources\[0\]: expected a SourceConfig, got dict"):
        DataConfig(validation_sources=[{"kind": "builtin"}])


def test_bad_batch_arguments(text_dir, tok):
    path, _ = text_dir
    with pytest.raises(ValueError, match=r"global_batch_size \(5\) must be a positive multiple of process_count \(2\)"):
        make_train_iterator(text_cfg(path), tok, seq_len=SEQ, global_batch_size=5, process_count=2)
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\), got 2"):
        make_train_iterator(text_cfg(path), tok, seq_len=SEQ, global_batch_size=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="data.validation_sources is empty"):
        make_eval_batches(text_cfg(path), tok, seq_len=SEQ, batch_size=2)
