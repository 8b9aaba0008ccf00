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


NON_ENGLISH_PAGES = {
    # Written for the tests (not the built-in sample's paragraphs): what language ID must drop.
    "fr": "Le marché du village ouvre chaque samedi matin. Les agriculteurs vendent des légumes, du fromage "
          "et du pain frais, et les enfants jouent près de la fontaine pendant que leurs parents discutent.",
    "de": "Der Zug nach Hamburg hatte heute Morgen eine Verspätung von zwanzig Minuten. Viele Reisende "
          "warteten geduldig auf dem Bahnsteig und tranken Kaffee aus dem kleinen Kiosk am Ende des Gleises.",
    "es": "La biblioteca municipal amplió su horario durante el verano. Ahora los estudiantes pueden leer "
          "y estudiar hasta las diez de la noche, y los sábados se organizan talleres para niños.",
    "ru": "Вчера вечером в городском парке прошёл концерт классической музыки. Несмотря на дождь, "
          "собралось много людей, и оркестр играл почти два часа без перерыва.",
}


@pytest.fixture(scope="session")
def english_pages():
    """English prose: the standard library's docstrings, one page per module (longest first)."""
    from llama_jax.curate.sample import docstring_pages

    return sorted(docstring_pages(), key=len, reverse=True)


@pytest.fixture(scope="session")
def curate_models(tmp_path_factory, english_pages):
    """The quality models, trained once per test run: KenLM + SentencePiece on 120 English pages, and the
    reference classifier on those pages against the same pages with their words shuffled."""
    import random

    from llama_jax.curate.quality_models import train_quality_models

    rng = random.Random(0)
    references = english_pages[20:140]
    randoms = []
    for page in references:
        words = page.split()
        rng.shuffle(words)
        randoms.append(" ".join(words))
    return train_quality_models(references, randoms, tmp_path_factory.mktemp("curate_models"), vocab_size=2000)
