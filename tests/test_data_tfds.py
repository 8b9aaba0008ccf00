"""TFDS sources: a dataset built offline from local files (array_record, no TensorFlow) in a temporary
data_dir, read through the same pipeline as every other source.

Oracle: the records as `tfds.data_source` itself returns them, and the same texts fed through a JSONL
source in the same order (identical batches expected).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from llama_jax.data import DataConfig, SourceConfig, make_eval_batches, make_train_iterator, validation_text
from llama_jax.data import corpus
from llama_jax.data.tokenizer import load_tokenizer, train_sentencepiece

SOURCE_DIR: Path | None = None  # set by the fixture before preparing


class LlamaJaxLocalText(tfds.core.GeneratorBasedBuilder):
    """Local text files -> records {"text": ..., "name": ...}; train and validation splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(SOURCE_DIR / "train"),
                "validation": self._generate_examples(SOURCE_DIR / "validation")}

    def _generate_examples(self, directory):
        for f in sorted(directory.iterdir()):
            yield f.name, {"text": f.read_text(encoding="utf-8"), "name": f.name}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    global SOURCE_DIR
    SOURCE_DIR = tmp_path_factory.mktemp("local")
    module = (corpus.stdlib_root() / "textwrap.py").read_text(encoding="utf-8")
    for split, count in (("train", 9), ("validation", 3)):
        (SOURCE_DIR / split).mkdir()
        for i in range(count):
            text = module[i * 301:i * 301 + 40 + 23 * i] + f" ✓{split}{i}"
            (SOURCE_DIR / split / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    data_dir = tmp_path_factory.mktemp("tfds")
    LlamaJaxLocalText(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    tok = load_tokenizer(train_sentencepiece([str(corpus.stdlib_root() / "textwrap.py")], 400,
                                             str(tmp_path_factory.mktemp("tok") / "t")))
    return data_dir, tok


def tfds_source(data_dir, **kw) -> SourceConfig:
    return SourceConfig(kind="tfds", name="llama_jax_local_text", data_dir=str(data_dir), **kw)


def test_tfds_dataset_reads_like_the_same_texts_in_jsonl(prepared, tmp_path):
    data_dir, tok = prepared
    records = tfds.data_source("llama_jax_local_text", split="train", data_dir=str(data_dir))
    texts = [records[i]["text"].decode("utf-8") for i in range(len(records))]
    assert sorted(texts) == sorted(f.read_text(encoding="utf-8") for f in (SOURCE_DIR / "train").iterdir())
    (tmp_path / "same.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    from_tfds = DataConfig(sources=[tfds_source(data_dir)], seed=5)
    from_jsonl = DataConfig(sources=[SourceConfig(kind="jsonl", path=str(tmp_path / "same.jsonl"))], seed=5)
    for process_index in (0, 1):
        a = make_train_iterator(from_tfds, tok, seq_len=12, global_batch_size=4, process_index=process_index,
                                process_count=2)
        b = make_train_iterator(from_jsonl, tok, seq_len=12, global_batch_size=4, process_index=process_index,
                                process_count=2)
        for _ in range(12):
            x, y = next(a), next(b)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert "tensorflow" not in sys.modules  # TFDS ran without TensorFlow


def test_tfds_validation_split_and_other_text_field(prepared):
    data_dir, tok = prepared
    cfg = DataConfig(validation_sources=[tfds_source(data_dir, split="validation"),
                                         tfds_source(data_dir, split="validation", text_field="name")])
    raw = validation_text(cfg)
    records = tfds.data_source("llama_jax_local_text", split="validation", data_dir=str(data_dir))
    assert raw == b"".join(records[i][field] for field in ("text", "name") for i in range(len(records)))
    batches = list(make_eval_batches(cfg, tok, seq_len=16, batch_size=2))
    assert sum(int(b["num_bytes"].sum()) for b in batches) == len(raw)


def test_tfds_bad_input(prepared, tmp_path):
    data_dir, tok = prepared

    def build(src):
        return make_train_iterator(DataConfig(sources=[src]), tok, seq_len=8, global_batch_size=2)

    with pytest.raises(ValueError, match="TFDS dataset 'no_such_corpus_xyz' is not in the catalog"):
        build(SourceConfig(kind="tfds", name="no_such_corpus_xyz", data_dir=str(data_dir)))
    with pytest.raises(ValueError, match=r"'llama_jax_local_text' is not prepared in data_dir='.*empty'"):
        build(tfds_source(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"has no split 'test' \(splits: \['train', 'validation'\]\)"):
        build(tfds_source(data_dir, split="test"))
    with pytest.raises(ValueError, match=r"has no feature 'body' \(features: \['name', 'text'\]\)"):
        build(tfds_source(data_dir, text_field="body"))


def test_eval_perplexity_reads_a_tfds_split(prepared, tmp_path, capsys):
    """`eval.py perplexity CKPT --data tfds:NAME --split S --data-dir D` scores exactly split S's records:
    the same numbers as the same texts (as `tfds.data_source` returns them) in a JSONL file, and the two
    splits give different numbers."""
    import importlib
    import shutil

    from llama_jax.checkpoint.params import save_params
    from llama_jax.model.api import init_params
    from llama_jax.model.config import ModelConfig

    data_dir, tok = prepared
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_hidden_dim=64, max_seq_len=32,
                      dtype="float32", attention_impl="xla")
    shutil.copy(tok.path, tmp_path / "tokenizer.model")  # a checkpoint's tokenizer travels under this name
    save_params(tmp_path / "ckpt", jax.tree.map(np.asarray, init_params(cfg, seed=1)), cfg,
                tokenizer_path=tmp_path / "tokenizer.model")
    cli = importlib.import_module("eval")
    common = [str(tmp_path / "ckpt"), "--dtype", "fp32", "--distributed", "off"]
    results = {}
    for split in ("train", "validation"):
        records = tfds.data_source("llama_jax_local_text", split=split, data_dir=str(data_dir))
        lines = "".join(json.dumps({"text": records[i]["text"].decode("utf-8")}) + "\n" for i in range(len(records)))
        (tmp_path / f"{split}.jsonl").write_text(lines, encoding="utf-8")
        assert cli.main(["perplexity", *common, "--data", "tfds:llama_jax_local_text", "--split", split,
                         "--data-dir", str(data_dir)]) == 0
        results[split] = json.loads(capsys.readouterr().out)
        assert cli.main(["perplexity", *common, "--data", str(tmp_path / f"{split}.jsonl")]) == 0
        assert json.loads(capsys.readouterr().out) == results[split]
        assert results[split]["documents"] == len(records)
    assert results["train"]["bytes"] != results["validation"]["bytes"]
