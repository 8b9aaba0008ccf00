"""A chat model made by transformers survives HF -> orbax -> HF, and fine-tuning then --to hf: the same
config, generation config, tokenizer, chat template and logits in transformers.

Oracle: transformers itself, loading the source directory it wrote and the exported one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import official_chat_templates as official
from llama_jax.convert import convert
from sft_tokenizers import LLAMA3_SPECIALS, make_tokenizer_dir

CONVERSATIONS = [
    [{"role": "system", "content": " Be terse. "}, {"role": "user", "content": "Hello there?"},
     {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "apple banana"}],
    [{"role": "user", "content": "Ünïcödé ok?"}],
]
# LLaMA 3 Instruct's pattern: BOS 0, EOS a list (end of turn first), pad an id of its own.
TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": [4, 1], "pad_token_id": 1}
GENERATION = {"bos_token_id": 0, "eos_token_id": [1, 4], "pad_token_id": 1, "do_sample": True,
              "temperature": 0.6, "top_p": 0.9}


def make_chat_model(directory: Path) -> Path:
    """A directory exactly as transformers saves a chat model: tokenizer.json (LLaMA 3's BOS post-processor),
    tokenizer_config.json, chat_template.jinja, config.json with an EOS list, generation_config.json.
    max_position_embeddings is Meta's default (2048): params.json has no place for another."""
    import transformers
    from tokenizers import Tokenizer, processors

    tok_dir = make_tokenizer_dir(directory.parent / "tok", LLAMA3_SPECIALS, None)
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    raw.save(str(tok_dir / "tokenizer.json"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    tokenizer.chat_template = official.LLAMA3
    tokenizer.pad_token = "<|end_of_text|>"
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, rms_norm_eps=1e-5, **TOKEN_IDS)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.generation_config = transformers.GenerationConfig(**GENERATION)
    model.save_pretrained(str(directory))
    return directory


def assert_same_chat_model(source: Path, export: Path, *, same_weights: bool = True, logits_of=None):
    import transformers

    def loaded(cls, directory):  # everything transformers reads, less where it read it from
        return {k: v for k, v in cls.from_pretrained(str(directory)).to_dict().items() if k != "_name_or_path"}

    assert loaded(transformers.AutoConfig, export) == loaded(transformers.AutoConfig, source)
    assert loaded(transformers.GenerationConfig, export) == loaded(transformers.GenerationConfig, source)
    theirs, ours = (transformers.AutoTokenizer.from_pretrained(str(d)) for d in (source, export))
    assert ours.chat_template == theirs.chat_template == official.LLAMA3
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, key) == getattr(theirs, key) and getattr(ours, key + "_id") == getattr(theirs, key + "_id")
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=True) \
                == theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=True)
    assert ours("apple banana")["input_ids"] == theirs("apple banana")["input_ids"]
    ids = torch.as_tensor([theirs.apply_chat_template(CONVERSATIONS[0], tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        exported = transformers.LlamaForCausalLM.from_pretrained(str(export)).float().eval()(ids).logits.numpy()
        before = transformers.LlamaForCausalLM.from_pretrained(str(source)).float().eval()(ids).logits.numpy()
    if same_weights:
        np.testing.assert_array_equal(exported, before)
    else:  # fine-tuned: other weights
        assert np.abs(exported - before).max() > 1e-3
    if logits_of is not None:
        np.testing.assert_allclose(exported, logits_of(ids.numpy()), atol=2e-5, rtol=0)


@pytest.mark.parametrize("via", ["orbax", "meta"])
def test_hf_to_ours_or_meta_to_hf_is_the_same_chat_model(tmp_path, monkeypatch, via):
    source = make_chat_model(tmp_path / "source")
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= \
        {p.name for p in source.iterdir()}
    monkeypatch.chdir(tmp_path)  # relative paths, as on a command line (orbax wants absolute ones)
    convert("source", via, to=via, progress=False)
    assert json.loads((tmp_path / via / "token_ids.json").read_text()) == TOKEN_IDS
    convert(tmp_path / via, tmp_path / "hf", to="hf", progress=False)
    assert_same_chat_model(source, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == [4, 1]


def test_sft_from_a_chat_model_exports_the_same_chat_model(tmp_path):
    """train.py from the directory (its weights and tokenizer), 2 steps of SFT, --to hf: everything but
    the weights is the source's; the weights give the run's own logits in transformers."""
    import jax

    from llama_jax.cli.convert import main as convert_main
    from llama_jax.cli.train import main as train_main
    from llama_jax.convert import read_checkpoint
    from llama_jax.model import api, transformer
    from test_sft_batches import conversation

    source = make_chat_model(tmp_path / "source")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(8)))
    run = tmp_path / "run"
    overrides = {
        "model": "tiny", "model.vocab_size": 320, "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.ffn_hidden_dim": 64, "model.max_seq_len": 2048, "model.norm_eps": 1e-5,
        "model.dtype": "float32", "model.attention_impl": "xla", "init_from": str(source), "tokenizer": str(source),
        "data.sources": f"[{{kind: chat, path: {tmp_path / 'train.jsonl'}}}]", "data.validation_sources": f"[{{kind: chat, path: {tmp_path / 'train.jsonl'}}}]",
        "data.chat_template": "llama3", "run_dir": str(run), "steps": 2, "global_batch_size": 2, "seq_len": 64,
        "eval_every": 0, "checkpoint_every": 2, "progress": "lines", "async_checkpointing": False,
    }
    assert train_main([f"{k}={v}" for k, v in overrides.items()]) == 0
    assert convert_main(["--to", "hf", str(run), str(tmp_path / "hf"), "--no-progress"]) == 0
    cfg, params, _ = read_checkpoint(run)
    model = transformer.build(cfg.replace(dtype="float32", attention_impl="xla"))
    api.load_into(model, jax.tree.map(np.asarray, params), source=str(run))
    logits = lambda ids: np.asarray(model(jax.numpy.asarray(ids))[0])  # (logits, cache)
    assert_same_chat_model(source, tmp_path / "hf", same_weights=False, logits_of=logits)


def test_a_scratch_run_exports_a_generation_config_from_its_tokenizer(tmp_path, stdlib_tokenizer):
    """No init_from, a SentencePiece tokenizer: config.json and generation_config.json say its BOS/EOS."""
    import transformers

    from llama_jax.cli.train import main as train_main

    run = tmp_path / "run"
    (tmp_path / "text.txt").write_text("the cat sees the dog and the dog sees the cat.\n" * 40)
    assert train_main(["model=tiny", "model.vocab_size=500", "model.dim=32", "model.n_layers=1", "model.n_heads=2",
                       "model.ffn_hidden_dim=64", "model.attention_impl=xla", "model.dtype=float32", "steps=1",
                       f"data.sources=[{{kind: text, path: {tmp_path / 'text.txt'}}}]",
                       f"data.validation_sources=[{{kind: text, path: {tmp_path / 'text.txt'}}}]",
                       "global_batch_size=2", "seq_len=32", "eval_every=0", f"run_dir={run}", "progress=lines",
                       "async_checkpointing=False", f"tokenizer={stdlib_tokenizer.path}"]) == 0
    convert(run, tmp_path / "hf", to="hf", progress=False)
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))
    assert (generation.bos_token_id, generation.eos_token_id) == (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.pad_token_id is None and generation.pad_token_id is None  # LLaMA's SentencePiece has no pad


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["bos_token_id", "eos_token_id", "pad_token_id", "other"]),
                       st.recursive(st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats() | st.text(max_size=3),
                                    lambda inner: st.lists(inner, max_size=3), max_leaves=5)))
def test_token_ids_reader_is_strict(tmp_path, data):
    from llama_jax.convert.common import ConvertError
    from llama_jax.convert.companions import read_token_ids

    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    try:
        ids = read_token_ids(path)
    except ConvertError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        return
    for key, value in ids.items():
        values = value if key == "eos_token_id" and isinstance(value, list) else [value]
        assert values and all(v is None or (type(v) is int and v >= 0) for v in values)
        assert value == data[key]
