"""Test setup: one CPU device, fp32 matmuls at full precision, and the fixtures many modules share.

`llama_jax` is imported as installed (`.ci/venv.sh` installs this checkout into the venv, editable).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

STDLIB_TOKENIZER_FILES = ("textwrap.py", "string.py", "shlex.py")


@pytest.fixture(scope="session")
def tiny_config():
    """A CPU-sized LLaMA: grouped-query attention, fp32 compute, the `xla` reference attention."""
    from llama_jax.model.config import ModelConfig

    return ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                       max_seq_len=64, dtype="float32", attention_impl="xla")


@pytest.fixture(scope="session")
def stdlib_tokenizer(tmp_path_factory):
    """A 500-piece SentencePiece BPE with LLaMA's settings, trained once per test run on three stdlib files."""
    from llama_jax.data import corpus
    from llama_jax.data.tokenizer import load_tokenizer, train_sentencepiece

    files = [str(corpus.stdlib_root() / name) for name in STDLIB_TOKENIZER_FILES]
    return load_tokenizer(train_sentencepiece(files, 500, str(tmp_path_factory.mktemp("tokenizer") / "stdlib")))
