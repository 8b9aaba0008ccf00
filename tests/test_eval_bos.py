"""BOS in front of evaluated text exactly when the tokenizer's own convention puts it there.

Oracle: transformers' default encoding (`AutoTokenizer(dir)(text)`) of the same tokenizer files, and its
LlamaForCausalLM (fp32) scoring those very ids. Kinds: LLaMA's SentencePiece model with its
tokenizer_config.json (`add_bos_token: true`, as every LLaMA 1/2 repository; or `false`), and a byte-level
tokenizer.json with (LLaMA 3) or without (SmolLM2-like) a BOS post-processor.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from llama_jax.data.tokenizer import load_tokenizer
from sft_tokenizers import LLAMA3_SPECIALS, make_tokenizer_dir

TEXTS = ["Hello there, how are you?", "apple banana cherry. Ünïcödé ok.", "I am fine"]


KINDS = {"sentencepiece-bos": True, "sentencepiece-no-bos": False, "tokenizer.json-bos": True,
         "tokenizer.json-no-bos": False}


def tokenizer_dir(tmp_path, kind, stdlib_tokenizer):
    directory = tmp_path / kind
    if kind.startswith("sentencepiece"):
        directory.mkdir()
        shutil.copyfile(stdlib_tokenizer.path, directory / "tokenizer.model")
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": KINDS[kind], "legacy": True,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
        return directory
    from tokenizers import Tokenizer, processors

    make_tokenizer_dir(directory, LLAMA3_SPECIALS, None)
    if KINDS[kind]:  # LLaMA 3's post-processor: BOS in front of every text
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
        tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.parametrize("kind", KINDS)
def test_adds_bos_is_transformers_default_encoding(tmp_path, stdlib_tokenizer, kind):
    import transformers

    directory = tokenizer_dir(tmp_path, kind, stdlib_tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = load_tokenizer(directory)
    assert ours.adds_bos is KINDS[kind]
    for text in TEXTS:
        assert ours.encode(text, bos=ours.adds_bos) == hf(text)["input_ids"]


@pytest.mark.parametrize("kind", ["sentencepiece-bos", "tokenizer.json-no-bos"])
def test_perplexity_tasks_and_harness_follow_the_tokenizer(tmp_path, stdlib_tokenizer, kind, capsys):
    """Default: transformers' model on transformers' default encoding; `--bos`/`--no-bos` override it."""
    import importlib

    import jax
    import transformers
    from flax import nnx

    from llama_jax.checkpoint.params import save_params
    from llama_jax.evaluation.harness import lm_class
    from llama_jax.evaluation.loading import place_model
    from llama_jax.evaluation.perplexity import evaluate_perplexity
    from llama_jax.evaluation.scoring import TokenScorer
    from llama_jax.evaluation.tasks import encode_pair
    from llama_jax.model.config import ModelConfig
    from oracle import hf_logits, hf_model, ours_from_hf

    directory = tokenizer_dir(tmp_path, kind, stdlib_tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    tok = load_tokenizer(directory)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_hidden_dim=64, dtype="float32",
                      attention_impl="xla", max_seq_len=64)
    hf = hf_model(cfg, seed=1)
    params = nnx.to_pure_dict(nnx.state(ours_from_hf(hf, cfg), nnx.Param))
    model = place_model(cfg, params, dtype="fp32", tokenizer=tok)

    def transformers_nll(ids):
        logp = torch.log_softmax(torch.as_tensor(hf_logits(hf, np.asarray(ids)[None])[0]).double(), -1).numpy()
        return -logp[np.arange(len(ids) - 1), np.asarray(ids)[1:]].sum(), len(ids) - 1

    def expected(bos):
        ids = [hf_tok(t)["input_ids"] for t in TEXTS]
        if bos is not None and bos != KINDS[kind]:
            ids = [[tok.bos_id] + i for i in ids] if bos else [i[1:] for i in ids]
        nll, n = map(sum, zip(*map(transformers_nll, ids)))
        return nll / n, n

    result = evaluate_perplexity(TokenScorer(model, batch_size=2), TEXTS, tok)
    assert result.tokens == expected(None)[1] and abs(result.mean_nll - expected(None)[0]) <= 1e-4
    ctx, cont = encode_pair(tok, "Hello there,", " how are you?")
    assert ctx == hf_tok("Hello there,")["input_ids"]
    lm = lm_class()(model=model)
    assert lm.tok_encode(TEXTS[0]) == hf_tok(TEXTS[0])["input_ids"]
    assert lm_class()(model=model, add_bos_token="True").tok_encode(TEXTS[0])[0] == tok.bos_id

    cli = importlib.import_module("eval")
    ckpt = tmp_path / "ckpt"
    save_params(ckpt, jax.tree.map(np.asarray, model.params), cfg, tokenizer_path=tok.path)
    (ckpt / "tokenizer_config.json").write_text((directory / "tokenizer_config.json").read_text())
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    for flag, bos in (([], None), (["--bos"], True), (["--no-bos"], False)):
        assert cli.main(["perplexity", str(ckpt), "--data", str(tmp_path / "docs.jsonl"), "--dtype", "fp32",
                         "--distributed", "off", *flag]) == 0
        out = json.loads(capsys.readouterr().out)
        mean_nll, tokens = expected(bos)
        assert out["tokens"] == tokens and abs(out["mean_nll"] - mean_nll) <= 1e-4, flag
