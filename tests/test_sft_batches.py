"""Fine-tuning batches: packing, truncation, skipping, resuming, and the masked loss.

Oracles: each conversation encoded on its own by the template (rows must hold exactly those tokens and
masks), an uninterrupted iterator (resume), transformers' LlamaForCausalLM in fp32 with labels -100 off
the answers (masked loss, same weights), and the same conversations run one per row (packing).
"""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llama_jax.data import DataConfig, SourceConfig, make_eval_batches, make_train_iterator
from llama_jax.data.chat_records import RecordError
from llama_jax.data.chat_template import ChatTemplate
from llama_jax.data.packing import padding_row
from llama_jax.data.sft import PackedRows, encode_source
from llama_jax.data.tokenizer import load_tokenizer
from llama_jax.model.config import ModelConfig
from llama_jax.training.step import batch_nll
from llama_jax.utils.config_io import ConfigError
from oracle import hf_model, ours_from_hf
from sft_tokenizers import LLAMA3_SPECIALS, make_tokenizer_dir

SEQ = 128
WORDS = "apple banana cherry how are you fine thanks Hello there".split()


def conversation(i: int) -> dict:
    """Varied lengths and turn counts: some with a system prompt, some multi-turn."""
    rng = np.random.default_rng(i)
    messages = [{"role": "system", "content": "Be terse."}] if i % 3 == 0 else []
    for turn in range(1 + i % 2):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 1 + (i * 7 + turn) % 5)]
        messages += [{"role": "user", "content": "Reverse: " + " ".join(words)},
                     {"role": "assistant", "content": " ".join(reversed(words))}]
    return {"messages": messages}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok"), LLAMA3_SPECIALS, None))


@pytest.fixture()
def chat_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(30)))
    return path


def data_config(path, **kwargs) -> DataConfig:
    src = SourceConfig(kind="chat", path=str(path))
    return DataConfig(sources=[src], validation_sources=[src], chat_template="llama3", **kwargs)


def test_rows_hold_each_conversation_once_as_its_own_segment(tok, chat_file):
    template = ChatTemplate("llama3", tok)
    expected = {tuple(ids.tolist()): mask for ids, mask in
                (template.encode(conversation(i)["messages"]) for i in range(30))}
    it = make_train_iterator(data_config(chat_file), tok, seq_len=SEQ, global_batch_size=1)
    rows = [{k: v[0] for k, v in next(it).items()} for _ in range(it._rows_per_epoch[0])]  # one epoch
    seen = []
    for row in rows:
        for s in range(1, row["segment_ids"].max() + 1):
            at = np.flatnonzero(row["segment_ids"] == s)
            assert (np.diff(at) == 1).all() and (row["positions"][at] == np.arange(len(at))).all()
            ids = (row["inputs"][at[0]], *row["targets"][at])
            mask = expected[tuple(int(t) for t in ids)]
            np.testing.assert_array_equal(row["loss_mask"][at], mask[1:])
            seen.append(ids)
        pad = row["segment_ids"] == 0
        assert (row["loss_mask"][pad] == 0).all() and (row["inputs"][pad] == tok.pad_id).all()
    assert sorted(seen) == sorted(expected) and len(seen) == 30


def test_too_long_is_cut_at_the_end_or_skipped_and_counted(tok, tmp_path, caplog):
    long_answer = {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": " ".join(WORDS * 12)}]}
    long_prompt = {"messages": [{"role": "user", "content": " ".join(WORDS * 12)},
                                {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long_answer) + "\n" + json.dumps(long_prompt) + "\n")
    template = ChatTemplate("llama3", tok)
    with caplog.at_level(logging.WARNING):
        examples = encode_source(SourceConfig(kind="chat", path=str(path)), template, SEQ)
    assert "skipped 1 conversation(s) whose first answer starts after seq_len=128" in caplog.text
    ids, mask = template.encode(long_answer["messages"])
    assert len(ids) > SEQ + 1
    np.testing.assert_array_equal(examples.ids, ids[:SEQ + 1])  # the prompt and the start of the answer
    np.testing.assert_array_equal(examples.mask, mask[:SEQ + 1])
    path.write_text(json.dumps(long_prompt) + "\n")
    with pytest.raises(ValueError, match="no conversation with an answer within seq_len=128"):
        encode_source(SourceConfig(kind="chat", path=str(path)), template, SEQ)


def test_a_record_the_template_refuses_names_file_and_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    path.write_text(json.dumps(conversation(1)) + "\n" + json.dumps({"messages": turns}) + "\n")
    cfg = DataConfig(sources=[SourceConfig(kind="chat", path=str(path))],
                     validation_sources=[SourceConfig(kind="chat", path=str(path))], chat_template="llama2")
    tok2 = load_tokenizer(make_tokenizer_dir(tmp_path / "t2", ("<unk>", "<s>", "</s>"), None))
    with pytest.raises(RecordError, match=rf"^{path}:2: chat_template llama2: llama2 conversations alternate"):
        make_train_iterator(cfg, tok2, seq_len=SEQ, global_batch_size=2)
    skip = SourceConfig(kind="chat", path=str(path), skip_bad_lines=True)
    assert encode_source(skip, ChatTemplate("llama2", tok2), SEQ).num_examples == 1


def test_config_refuses_mixing_text_and_conversations_and_unknown_templates(chat_file):
    with pytest.raises(ConfigError, match="cannot be mixed"):
        DataConfig(sources=[SourceConfig(kind="chat", path=str(chat_file))])  # builtin validation
    with pytest.raises(ConfigError, match="chat_template: 'vicuna' is not one of"):
        DataConfig(sources=[SourceConfig(kind="chat", path="x")], validation_sources=[], chat_template="vicuna")


def test_resumed_iterator_gives_the_same_batches(tok, chat_file):
    cfg = data_config(chat_file)
    first = make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=2)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    second = make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=2)
    second.set_state(state)
    for _ in range(10):  # past an epoch boundary: rows are reshuffled per epoch
        a, b = next(first), next(second)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# --- the masked loss ------------------------------------------------------------------------------------

def model_cfg(tok) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                       max_seq_len=SEQ, dtype="float32", attention_impl="xla")


@pytest.fixture(scope="module")
def model_and_examples(tok, tmp_path_factory):
    """A tiny LLaMA with transformers' random weights (ours and HF's), and 30 encoded conversations."""
    path = tmp_path_factory.mktemp("chat") / "train.jsonl"
    path.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(30)))
    cfg = model_cfg(tok)
    hf = hf_model(cfg, seed=3)
    params = nnx.to_pure_dict(nnx.state(ours_from_hf(hf, cfg), nnx.Param))
    examples = encode_source(SourceConfig(kind="chat", path=str(path)), ChatTemplate("llama3", tok), SEQ)
    return cfg, hf, params, examples


def stack_rows(rows: list[dict], num_rows: int, pad_id: int) -> dict:
    """Rows as a batch of `num_rows` (empty rows added), so every batch here compiles once."""
    rows = rows + [padding_row(SEQ, pad_id, with_bytes=False)] * (num_rows - len(rows))
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def one_per_row(examples, n: int, pad_id: int) -> list[dict]:
    return [PackedRows(examples, np.array([i]), SEQ, pad_id=pad_id).row(0) for i in range(n)]


def test_masked_loss_equals_transformers_with_ignored_labels(tok, model_and_examples):
    """One conversation per row, right-padded; HF gets labels = ids on answer tokens, -100 elsewhere."""
    cfg, hf, params, examples = model_and_examples
    batch = stack_rows(one_per_row(examples, 8, tok.pad_id), 8, tok.pad_id)
    nll, count = jax.jit(lambda p, b: batch_nll(cfg, p, b))(params, batch)
    ids = np.full((8, SEQ + 1), tok.pad_id)
    labels = np.full((8, SEQ + 1), -100)
    attention = np.zeros((8, SEQ + 1), np.int64)
    for i in range(8):
        lo, hi = examples.offsets[i], examples.offsets[i + 1]
        ids[i, :hi - lo] = examples.ids[lo:hi]
        labels[i, :hi - lo] = np.where(examples.mask[lo:hi], examples.ids[lo:hi], -100)
        attention[i, :hi - lo] = 1
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(attention),
                 labels=torch.as_tensor(labels))
    assert int(count) == int((labels[:, 1:] != -100).sum()) > 0
    assert float(nll / count) == pytest.approx(float(out.loss), abs=1e-5)


def test_packed_rows_give_the_loss_and_gradients_of_one_conversation_per_row(tok, model_and_examples):
    cfg, _, params, examples = model_and_examples
    n = 12
    packed_rows = PackedRows(examples, np.arange(n), SEQ, pad_id=tok.pad_id)
    assert packed_rows.num_rows < n  # conversations share rows
    packed = stack_rows([packed_rows.row(r) for r in range(packed_rows.num_rows)], n, tok.pad_id)
    alone = stack_rows(one_per_row(examples, n, tok.pad_id), n, tok.pad_id)

    def mean_loss(p, batch):
        nll, count = batch_nll(cfg, p, batch)
        return nll / count

    loss_and_grads = jax.jit(jax.value_and_grad(mean_loss))
    loss_packed, grads_packed = loss_and_grads(params, packed)
    loss_alone, grads_alone = loss_and_grads(params, alone)
    assert float(loss_packed) == pytest.approx(float(loss_alone), abs=1e-5)
    for a, b in zip(jax.tree.leaves(grads_packed), jax.tree.leaves(grads_alone)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_eval_batches_cover_every_answer_token_once(tok, chat_file):
    cfg = data_config(chat_file)
    template = ChatTemplate("llama3", tok)
    answers = sum(int(template.encode(conversation(i)["messages"])[1][1:].sum()) for i in range(30))
    batches = list(make_eval_batches(cfg, tok, seq_len=SEQ, batch_size=4))
    assert sum(float(b["loss_mask"].sum()) for b in batches) == answers
    assert "num_bytes" not in batches[0]
