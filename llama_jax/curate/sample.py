"""The built-in sample: a small, CommonCrawl-like crawl generated on the spot (nothing downloaded).

English pages are the Python standard library's docstrings (one page per module, the text the default
training corpus is made of), mixed with what a crawl really holds and each stage should catch:

- boilerplate lines (cookie banners, navigation) repeated across many pages and shards: line dedup;
- pages in other languages: language ID;
- pages of shuffled words (fluent-looking vocabulary, no syntax): the KenLM quality buckets;
- exact copies of some pages (line dedup empties them), and reflowed near-copies (one word in ~300
  changed) of pages made of new lines (so line dedup cannot see them): MinHash.

Beyond the docstring pages, `target_bytes` is reached with synthetic pages whose lines recombine
docstring sentences, so every line is new and every stage has work to do (the benchmark's 50 MB).
Everything is a pure function of the Python installation and `seed`.
"""
from __future__ import annotations

import ast
import gzip
import inspect
import json
import random
import re
from pathlib import Path

from llama_jax.data import corpus

BOILERPLATE = (
    "Accept all cookies | Manage preferences | Privacy policy",
    "Subscribe to our newsletter for the latest updates.",
    "Home > Documentation > Library Reference",
    "Copyright 2024 Example Media Group. All rights reserved.",
    "Share on Facebook Share on Twitter Share by email",
    "Skip to main content",
)

NON_ENGLISH = {
    "fr": "La bibliothèque standard fournit des modules pour lire des fichiers, gérer les dates et "
          "communiquer sur le réseau. Chaque module est documenté, et les exemples montrent comment "
          "l'utiliser sans installer de paquet supplémentaire. Les développeurs apprécient cette approche.",
    "de": "Die Standardbibliothek enthält Module zum Lesen von Dateien, zum Umgang mit Datumswerten und "
          "zur Kommunikation über das Netzwerk. Jedes Modul ist dokumentiert, und die Beispiele zeigen, "
          "wie man es ohne zusätzliche Pakete verwendet. Viele Entwickler schätzen diesen Ansatz sehr.",
    "es": "La biblioteca estándar ofrece módulos para leer archivos, manejar fechas y comunicarse por la "
          "red. Cada módulo está documentado y los ejemplos muestran cómo usarlo sin instalar paquetes "
          "adicionales. Muchos programadores valoran mucho esta forma de trabajar.",
    "it": "La libreria standard offre moduli per leggere file, gestire le date e comunicare in rete. "
          "Ogni modulo è documentato e gli esempi mostrano come usarlo senza installare pacchetti "
          "aggiuntivi. Molti sviluppatori apprezzano questo approccio pratico.",
    "pt": "A biblioteca padrão oferece módulos para ler arquivos, lidar com datas e comunicar pela rede. "
          "Cada módulo está documentado e os exemplos mostram como usá-lo sem instalar pacotes extras. "
          "Muitos programadores gostam bastante dessa abordagem.",
    "nl": "De standaardbibliotheek bevat modules om bestanden te lezen, met datums te werken en via het "
          "netwerk te communiceren. Elke module is gedocumenteerd en de voorbeelden laten zien hoe je "
          "hem gebruikt zonder extra pakketten te installeren.",
    "pl": "Biblioteka standardowa zawiera moduły do czytania plików, obsługi dat i komunikacji przez "
          "sieć. Każdy moduł jest udokumentowany, a przykłady pokazują, jak go używać bez instalowania "
          "dodatkowych pakietów. Wielu programistów bardzo to docenia.",
    "ru": "Стандартная библиотека содержит модули для чтения файлов, работы с датами и обмена данными "
          "по сети. Каждый модуль документирован, а примеры показывают, как использовать его без "
          "установки дополнительных пакетов. Многие разработчики ценят такой подход.",
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def docstring_pages() -> list[str]:
    """One page per standard-library module: its docstrings (module, classes, functions) of > 80
    characters, as paragraphs; modules with under 500 characters of them are left out."""
    pages = []
    for path in corpus.builtin_files("train"):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = (ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
        paragraphs = [inspect.cleandoc(d) for d in docs if d and len(d) > 80]
        text = "\n\n".join(paragraphs)
        if len(text) > 500:
            pages.append(text)
    return pages


def _near_copy(text: str, rng: random.Random) -> str:
    """`text` reflowed (each paragraph on one line, as another site's template would lay it out) with
    one word in ~300 replaced: no line of it repeats the original's, so line dedup keeps it, while its
    word 5-grams are ~0.97 Jaccard-similar to the original's: MinHash's to remove."""
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    words = "\n".join(paragraphs).split(" ")
    for i in range(rng.randrange(150), len(words), 300):
        words[i] = "zqx" + words[i]
    return " ".join(words)


def _shuffled_words(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12))


def _synthetic_page(sentences: list[str], rng: random.Random, lines: tuple[int, int] = (4, 12)) -> str:
    """Lines of 2-4 random docstring sentences: new lines, so line dedup keeps them."""
    return "\n".join(" ".join(rng.choice(sentences) for _ in range(rng.randint(2, 4)))
                     for _ in range(rng.randint(*lines)))


def sample_pages(target_bytes: int, seed: int = 0) -> list[dict]:
    """The sample crawl as records {"id", "text", "kind"} (kind says what was planted, for tests and the
    funnel's reader), in a seeded order."""
    rng = random.Random(seed)
    base = docstring_pages()
    records = []
    for i, text in enumerate(base):
        lines = text.split("\n")
        if rng.random() < 0.6:
            lines.insert(0, rng.choice(BOILERPLATE))
        if rng.random() < 0.6:
            lines.append(rng.choice(BOILERPLATE))
        records.append({"id": f"docstrings/{i}", "text": "\n".join(lines), "kind": "english"})
    for lang, text in NON_ENGLISH.items():
        records.append({"id": f"lang/{lang}", "text": text, "kind": f"non_english:{lang}"})
    long_pages = [t for t in base if len(t.split()) > 600]
    for i, text in enumerate(rng.sample(long_pages, min(10, len(long_pages)))):
        records.append({"id": f"exact/{i}", "text": text, "kind": "exact_duplicate"})
    for i, text in enumerate(rng.sample(base, min(20, len(base)))):
        records.append({"id": f"shuffled/{i}", "text": _shuffled_words(text, rng), "kind": "shuffled_words"})
    sentences = [s for t in base for s in _SENTENCE_END.split(t.replace("\n", " ")) if 40 < len(s) < 300]
    for i in range(10):  # near-copies of pages whose every line is new: only MinHash can see the pair
        text = _synthetic_page(sentences, rng, lines=(30, 40))
        records.append({"id": f"near_original/{i}", "text": text, "kind": "synthetic"})
        records.append({"id": f"near/{i}", "text": _near_copy(text, rng), "kind": "near_duplicate"})
    size = sum(len(r["text"].encode()) for r in records)
    i = 0
    while size < target_bytes:
        text = _synthetic_page(sentences, rng)
        records.append({"id": f"synthetic/{i}", "text": text, "kind": "synthetic"})
        size += len(text.encode())
        i += 1
    rng.shuffle(records)
    return records


def write_sample(directory: str | Path, target_bytes: int, shards: int = 4, seed: int = 0) -> list[Path]:
    """Write the sample crawl as `shards` gzipped JSONL files; an existing complete sample is reused."""
    directory = Path(directory)
    done = directory / ".complete"
    paths = [directory / f"crawl-{i:03d}.jsonl.gz" for i in range(shards)]
    if done.is_file() and done.read_text() == f"{target_bytes} {shards} {seed}":
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    records = sample_pages(target_bytes, seed)
    for shard, path in enumerate(paths):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            for record in records[shard::shards]:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    done.write_text(f"{target_bytes} {shards} {seed}")
    return paths
