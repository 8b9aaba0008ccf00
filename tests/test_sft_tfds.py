"""Conversation sources from TFDS: a dataset built offline (array_record, no TensorFlow) in a temporary
data_dir, with Alpaca-like fields under other names, ShareGPT turns and chat messages as TFDS sequences.

Oracles: the same records written as JSONL and read by the JSONL readers (the same messages expected, and
identical fine-tuning batches); the records as `tfds.data_source` itself returns them.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llama_jax.data import DataConfig, SourceConfig, make_train_iterator
from llama_jax.data.chat_records import RecordError, read_conversations
from llama_jax.data.sft import read_source
from llama_jax.data.tokenizer import load_tokenizer
from llama_jax.utils.config_io import ConfigError
from sft_tokenizers import LLAMA3_SPECIALS, make_tokenizer_dir

NAME = "llama_jax_local_chat"


def record(i: int) -> dict:
    """Record i in all three shapes; record 5's ShareGPT turn has an unknown speaker ("bot")."""
    words = ["apple", "banana", "cherry", "moon", "río ✓"][: 1 + i % 5]
    question, answer = "Reverse: " + " ".join(words), " ".join(reversed(words))
    system = [{"from": "system", "value": "Be terse."}] if i % 2 else []
    return {"index": i, "question": question, "context": f"case {i}" if i % 3 else "", "answer": answer,
            "conversations": system + [{"from": "human", "value": question},
                                       {"from": "bot" if i == 5 else "gpt", "value": answer}],
            "messages": [{"role": r, "text": t} for r, t in (("user", question), ("assistant", answer),
                                                             ("user", "Again?"), ("assistant", answer))[: 2 + 2 * (i % 2)]]}


RECORDS = [record(i) for i in range(8)]


class LlamaJaxLocalChat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(np.int32), "question": text, "context": text, "answer": text,
            "conversations": tfds.features.Sequence({"from": text, "value": text}),
            "messages": tfds.features.Sequence({"role": text, "text": text})}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, r in enumerate(RECORDS):
            yield i, r


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    LlamaJaxLocalChat(data_dir=str(directory), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(directory)


def tfds_order(data_dir) -> list[int]:
    """RECORDS' indices in the order `tfds.data_source` returns them (TFDS shuffles by key)."""
    records = tfds.data_source(NAME, split="train", data_dir=data_dir)
    order = [int(records[i]["index"]) for i in range(len(records))]
    assert sorted(order) == list(range(len(RECORDS)))
    assert [records[i]["answer"].decode() for i in range(len(records))] == [RECORDS[i]["answer"] for i in order]
    return order


def tfds_chat(data_dir, kind, **kw) -> SourceConfig:
    return SourceConfig(kind=kind, name=NAME, data_dir=data_dir, **kw)


SHAPES = {  # kind -> (fields renames, the JSONL record of RECORDS[i] in that format)
    "alpaca": (["instruction=question", "input=context", "output=answer"],
               lambda r: {"instruction": r["question"], "input": r["context"], "output": r["answer"]}),
    "sharegpt": ([], lambda r: {"conversations": r["conversations"]}),
    "chat": (["content=text"], lambda r: {"messages": [{"role": m["role"], "content": m["text"]}
                                                       for m in r["messages"]]}),
}


@pytest.mark.parametrize("kind", list(SHAPES))
def test_tfds_conversations_are_the_jsonl_readers_messages(data_dir, tmp_path, kind):
    """Each format, with its fields renamed (also inside turns), gives the messages the JSONL reader gives
    for the same records; ShareGPT's unknown speaker is the same error, named by split and record index."""
    fields, shaped = SHAPES[kind]
    order = tfds_order(data_dir)
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(shaped(RECORDS[i])) + "\n" for i in order), encoding="utf-8")
    expected = [m for _, m in read_conversations(kind, str(jsonl), skip_bad_lines=True)]
    got = list(read_source(tfds_chat(data_dir, kind, fields=fields, skip_bad_lines=True)))
    assert [m for _, m in got] == expected
    assert len(expected) == (7 if kind == "sharegpt" else 8)
    assert got[0][0] == f"tfds:{NAME}[train]#0"
    if kind == "sharegpt":
        with pytest.raises(RecordError, match=rf"^tfds:{NAME}\[train\]#{order.index(5)}: conversations\[2\].from: unknown speaker "
                                              r"'bot' .*; set skip_bad_lines"):
            list(read_source(tfds_chat(data_dir, kind)))
    assert "tensorflow" not in sys.modules  # TFDS ran without TensorFlow


def test_tfds_chat_source_batches_equal_the_jsonl_ones(data_dir, tmp_path):
    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "tok", LLAMA3_SPECIALS, None))
    fields, shaped = SHAPES["chat"]
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(shaped(RECORDS[i])) + "\n" for i in tfds_order(data_dir)), encoding="utf-8")
    iterators = [make_train_iterator(DataConfig(sources=[src], validation_sources=[], chat_template="llama3", seed=3),
                                     tok, seq_len=64, global_batch_size=2)
                 for src in (tfds_chat(data_dir, "chat", fields=fields), SourceConfig(kind="chat", path=str(jsonl)))]
    for _ in range(6):
        a, b = (next(it) for it in iterators)
        assert a.keys() == b.keys() and a["loss_mask"].sum() > 0
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_conversation_source_config_errors():
    with pytest.raises(ConfigError, match="either a path .JSONL. or a name .TFDS dataset., not both"):
        SourceConfig(kind="chat", path="x.jsonl", name=NAME)
    with pytest.raises(ConfigError, match="a sharegpt source needs either a path"):
        SourceConfig(kind="sharegpt")
    with pytest.raises(ConfigError, match="source fields: only conversation sources"):
        SourceConfig(kind="jsonl", path="x.jsonl", fields=["text=body"])
    with pytest.raises(ConfigError, match="source fields: 'output' is not of the form format_field=dataset_field"):
        SourceConfig(kind="alpaca", name=NAME, fields=["output"])
