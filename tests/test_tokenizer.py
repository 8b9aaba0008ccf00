"""Tokenizers: LLaMA-style SentencePiece training, both file kinds behind one interface, bad input.

Oracles: the `sentencepiece` library itself (ids, pieces, trainer settings read back from the model
proto), transformers' own SentencePiece -> tokenizer.json converter run by the Rust `tokenizers` library
(an independent encoder that must agree id for id), and Python's UTF-8 codec (byte fallback, byte counts).
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2

from fuzzing import JSON_VALUES, fast_and_slow

from llama_jax.data import corpus
from llama_jax.cli.train import tokenizer_main
from llama_jax.data.tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer, builtin_tokenizer,
                                 check_vocab_size, load_tokenizer, train_sentencepiece)

VOCAB = 600
# Characters that never occur in the training text: they can only be encoded through byte fallback.
UNSEEN = "漢字 €😀"
SAMPLES = ["def f(x):\n    return x + 12345\n", "  two leading spaces", "tabs\tand\nnewlines\n\n",
           f"unseen {UNSEEN} chars", "3.14159 and 2718281828", " ", "x"]


def training_files() -> list[str]:
    """A few hundred kB of real text: some standard-library modules (ASCII source)."""
    names = ["textwrap.py", "string.py", "bisect.py", "colorsys.py", "shlex.py", "fnmatch.py"]
    return [str(corpus.stdlib_root() / n) for n in names]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> str:
    return train_sentencepiece(training_files(), VOCAB, str(tmp_path_factory.mktemp("tok") / "llama"))


@pytest.fixture(scope="module")
def hf_dir(sp_path, tmp_path_factory) -> Path:
    """The same model converted to tokenizer.json by transformers (not by us)."""
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto.FromString(Path(sp_path).read_bytes())
    hf = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)})
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])  # as in LLaMA 2's tokenizer.json
    out = tmp_path_factory.mktemp("hf")
    hf.save(str(out / "tokenizer.json"))
    return out


def test_training_uses_llama_settings(sp_path):
    proto = sentencepiece_model_pb2.ModelProto.FromString(Path(sp_path).read_bytes())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert (t.split_digits, t.byte_fallback, t.allow_whitespace_only_pieces) == (True, True, True)
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, -1)
    assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces) == ("identity", True, False)
    assert len(proto.pieces) == VOCAB
    # The model does not remember where it was trained (deterministic bytes wherever it is built).
    assert list(t.input) == [] and t.model_prefix == ""


def test_training_is_deterministic(sp_path, tmp_path):
    again = train_sentencepiece(training_files(), VOCAB, str(tmp_path / "again"))
    assert Path(again).read_bytes() == Path(sp_path).read_bytes()
    assert (tmp_path / "again.vocab").read_text(encoding="utf-8").count("\n") == VOCAB


def test_sentencepiece_tokenizer_matches_the_library(sp_path):
    tok = load_tokenizer(sp_path)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.path == sp_path
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, VOCAB)
    assert tok.pad_id == tok.eos_id  # LLaMA's pad_id is -1: the documented stand-in
    for text in SAMPLES:
        ids = sp.encode(text)
        assert tok.encode(text, bos=False) == ids
        assert tok.encode(text) == [1] + ids
        assert tok.encode(text, eos=True) == [1] + ids + [2]
        assert tok.decode(tok.encode(text, eos=True)) == text


def test_digits_are_split_and_unseen_characters_go_through_bytes(sp_path):
    tok = load_tokenizer(sp_path)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    digits = "9876543210"
    pieces = [sp.id_to_piece(i) for i in tok.encode(digits, bos=False)]
    assert [p.lstrip("▁") for p in pieces if p.lstrip("▁")] == list(digits)
    for ch in UNSEEN.replace(" ", ""):
        pieces = [sp.id_to_piece(i) for i in tok.encode(ch, bos=False)]
        byte_pieces = [p for p in pieces if p.startswith("<0x")]
        assert byte_pieces == [f"<0x{b:02X}>" for b in ch.encode("utf-8")]
        assert tok.decode(tok.encode(ch)) == ch


def test_tokenizer_json_agrees_with_sentencepiece(sp_path, hf_dir):
    sp_tok = load_tokenizer(sp_path)
    hf_tok = load_tokenizer(hf_dir)  # a directory with only tokenizer.json; BOS/EOS by LLaMA's names
    assert isinstance(hf_tok, HuggingFaceTokenizer) and hf_tok.path == str(hf_dir / "tokenizer.json")
    assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id, hf_tok.vocab_size) == (1, 2, 2, VOCAB)
    texts = SAMPLES + [Path(f).read_text(encoding="utf-8") for f in training_files()[:2]]
    for text in texts:
        assert hf_tok.encode(text, eos=True) == sp_tok.encode(text, eos=True)
        assert hf_tok.decode(sp_tok.encode(text, eos=True)) == text
    assert hf_tok.encode_batch(texts) == sp_tok.encode_batch(texts)


def test_tokenizer_config_names_the_special_tokens(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "</s>"}, "eos_token": "<s>", "pad_token": "<unk>"}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>", "eos_token": "</s>"}))
    with pytest.raises(ValueError, match=r"bos_token '<nope>' is not in the vocabulary"):
        load_tokenizer(tmp_path)


def test_byte_counts_add_up_to_the_text(sp_path, hf_dir, tmp_path):
    """Both backends credit every UTF-8 byte once, through different offset mechanisms."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    # A LLaMA-3-style byte-level BPE (its tokens can split a character's bytes).
    bl = tokenizers.Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train(training_files(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bl.save(str(tmp_path / "tokenizer.json"))
    byte_level = load_tokenizer(tmp_path)
    assert (byte_level.bos_id, byte_level.eos_id) == (0, 1)

    sp_tok, hf_tok = load_tokenizer(sp_path), load_tokenizer(hf_dir)
    for text in SAMPLES + [Path(training_files()[0]).read_text(encoding="utf-8")]:
        expected = len(text.encode("utf-8"))
        for tok in (sp_tok, hf_tok, byte_level):
            ids, counts = tok.encode_with_byte_counts(text)
            assert ids == tok.encode(text, bos=False)
            assert counts.min() >= 0 and int(counts.sum()) == expected, (tok.path, text)
        if text.isascii():
            # The two libraries report spans independently (sentencepiece in bytes, tokenizers in
            # characters). They may credit the first character to the dummy-prefix token or to the next
            # one (and a split character to its first or last byte token), but on ASCII text they agree
            # on every running total after the first token.
            sp_counts, hf_counts = sp_tok.encode_with_byte_counts(text)[1], hf_tok.encode_with_byte_counts(text)[1]
            assert list(np.cumsum(sp_counts)[1:]) == list(np.cumsum(hf_counts)[1:])
        assert byte_level.decode(byte_level.encode(text, eos=True)) == text


def test_bad_tokenizer_files(tmp_path, sp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file .*missing.model does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")
    ranks = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))  # tiktoken's layout
    (tmp_path / "tokenizer.model").write_text(ranks)
    with pytest.raises(ValueError, match=r"tokenizer.model: a tiktoken BPE file \(Meta's LLaMA 3 release\), which "
                                         r"llama_jax does not read: use the Hugging Face release's tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="junk.json: not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "junk.json")


def test_vocab_size_mismatch_is_refused(sp_path):
    tok = load_tokenizer(sp_path)
    check_vocab_size(tok, VOCAB)
    with pytest.raises(ValueError, match=rf"has vocab_size {VOCAB} but the model's vocab_size is 32000"):
        check_vocab_size(tok, 32000)


def test_command_line_training(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for f in training_files()[:3]:
        (data / Path(f).name).write_bytes(Path(f).read_bytes())
    prefix = str(tmp_path / "out" / "tok")
    assert tokenizer_main(["--data", str(data / "*.py"), "--vocab-size", "500", "--output", prefix]) == 0
    assert capsys.readouterr().out.strip() == prefix + ".model"
    assert load_tokenizer(prefix + ".model").vocab_size == 500
    # A directory gives the same files, hence the same model.
    assert tokenizer_main(["--data", str(data), "--vocab-size", "500", "--output", prefix + "2"]) == 0
    assert Path(prefix + "2.model").read_bytes() == Path(prefix + ".model").read_bytes()
    assert tokenizer_main(["--data", str(tmp_path / "nope.txt"), "--vocab-size", "500", "--output", prefix]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
    (data / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert tokenizer_main(["--data", str(data), "--vocab-size", "500", "--output", prefix]) == 2
    assert "latin1.txt: not UTF-8 text" in capsys.readouterr().err


def test_builtin_tokenizer_is_trained_once_and_cached(tmp_path):
    tok = builtin_tokenizer(512, str(tmp_path))
    (model,) = tmp_path.glob("builtin-*-v512.model")
    assert tok.path == str(model) and tok.vocab_size == 512
    before = os.stat(model).st_mtime_ns
    assert builtin_tokenizer(512, str(tmp_path)).path == str(model)
    assert os.stat(model).st_mtime_ns == before  # reused, not retrained
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name, model.with_suffix(".vocab").name]
    text = corpus.builtin_files("validation")[0].read_text(encoding="utf-8")
    assert tok.decode(tok.encode(text, eos=True)) == text


# ----------------------------------------------------------------------------- tokenizer_config.json

CONFIG = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "pad_token": None,
          "add_bos_token": True, "model_max_length": 4096}


def _loads_as_it_says_or_names_the_config(directory: Path) -> None:
    """A tokenizer with the special ids its tokenizer_config.json names (or, when it names no BOS and
    EOS, LLaMA's `<s>`/`</s>`), or a TokenizerError naming that file; nothing else."""
    from llama_jax.data.tokenizer import TokenizerError

    config_path = directory / "tokenizer_config.json"
    try:
        tok = load_tokenizer(directory)
    except TokenizerError as e:
        assert str(e).startswith(f"{config_path}: ") and "\n" not in str(e), str(e)
        return
    config = json.loads(config_path.read_bytes().decode("utf-8"))
    named = {key: (value["content"] if isinstance(value, dict) else value)
             for key in ("bos_token", "eos_token", "pad_token") if (value := config.get(key)) is not None}
    pieces = {key: tok._tok.id_to_token(getattr(tok, key.replace("_token", "_id")))
              for key in ("bos_token", "eos_token", "pad_token")}
    if named.get("bos_token") and named.get("eos_token"):
        assert pieces["bos_token"] == named["bos_token"] and pieces["eos_token"] == named["eos_token"]
        assert pieces["pad_token"] == named.get("pad_token", named["eos_token"])
    else:
        assert (pieces["bos_token"], pieces["eos_token"], pieces["pad_token"]) == ("<s>", "</s>", "</s>")


@pytest.mark.parametrize("content, message", [
    (b"\xff{}", "not UTF-8 (byte 0)"),
    (b'{"bos_token": ', "invalid JSON (Expecting value"),
    (b"[]", "expected a JSON object, got list"),
    (b'{"bos_token": 1, "eos_token": "</s>"}', "bos_token: expected a token string or an object with a \"content\" string, got 1"),
    (b'{"bos_token": {"lstrip": true}, "eos_token": "</s>"}', "bos_token: an AddedToken object without \"content\""),
    (b'{"bos_token": "<s>", "eos_token": {"content": ["</s>"]}}', "eos_token: expected a token string"),
    (b'{"bos_token": "<s>", "eos_token": "</s>", "pad_token": ""}', "pad_token: expected a token string"),
    (b'{"bos_token": "<s>", "eos_token": "</nope>"}', "eos_token '</nope>' is not in the vocabulary of tokenizer.json"),
])
def test_a_wrong_tokenizer_config_is_one_line_naming_file_and_field(hf_dir, tmp_path, content, message):
    from llama_jax.data.tokenizer import TokenizerError

    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(TokenizerError) as error:
        load_tokenizer(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'tokenizer_config.json'}: {message}")


@pytest.fixture(scope="module")
def hf_copy(hf_dir, tmp_path_factory) -> Path:
    """tokenizer.json in a directory of its own, whose tokenizer_config.json the fuzz tests rewrite."""
    directory = tmp_path_factory.mktemp("fuzzed_config")
    (directory / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    return directory


def _mutated_config(hf_copy, edits):
    raw = bytearray(json.dumps(CONFIG).encode())
    for position, value in edits:
        raw[position % len(raw)] = value
    (hf_copy / "tokenizer_config.json").write_bytes(bytes(raw))
    _loads_as_it_says_or_names_the_config(hf_copy)


def _wrong_config_values(hf_copy, changes, as_object):
    config = {**CONFIG}
    for key, value in changes.items():
        config[key] = {"content": value} if as_object else value
    (hf_copy / "tokenizer_config.json").write_text(json.dumps(config))
    _loads_as_it_says_or_names_the_config(hf_copy)


test_config_byte_mutations, test_config_byte_mutations_many = fast_and_slow(
    _mutated_config, edits=st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)), min_size=1, max_size=4))
test_config_wrong_values, test_config_wrong_values_many = fast_and_slow(
    _wrong_config_values, as_object=st.booleans(), changes=st.dictionaries(
        st.sampled_from(["bos_token", "eos_token", "pad_token"]),
        JSON_VALUES | st.sampled_from(["<s>", "</s>", "<unk>", "<nope>", "", "▁the"]), min_size=1, max_size=3))
