"""A labelled crawl and the measure of what curation keeps of it: the proof that the CommonCrawl stages
keep what they should.

The crawl mixes, with a label per page, what a crawl holds and what each stage is for:

- `good`: English pages (standard-library docstrings, the sample's prose), every third followed by the
  same two boilerplate footer lines;
- `exact`: pairs of identical pages, the two copies in different shards;
- `near`: pairs whose second copy has one word in 100 changed (at least two) and a line appended, as a
  page republished elsewhere; Jaccard similarity of their word 5-grams ~0.8-0.9;
- `salad`: a good page's words shuffled; `gibberish`: random letters; `non_english`: other languages;
  `short`: a few words (navigation, stubs).

Of each pair exactly one copy should survive; of the other labels, all `good` pages and none of the rest.
`keep_metrics` counts that: survivors per label, pairs with exactly one survivor, and precision/recall of
"keep" where a pair is one wanted page (a pair with a survivor is recalled; a second survivor is a false
keep). Everything is a pure function of the pages given and `seed`.
"""
from __future__ import annotations

import gzip
import json
import random
import string
from pathlib import Path

from llama_jax.curate.sample import NON_ENGLISH

FOOTER = ("Share this page: Facebook | Twitter | Email | Print",
          "Copyright 2026 Example Publishing. All rights reserved. Terms of use.")
PAIR_LABELS = ("exact", "near")
UNWANTED = ("salad", "gibberish", "non_english", "short")


def split_pages(english: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Disjoint page sets from (at least 310) English pages, in a fixed order: 140 reference pages (the
    KenLM model), 60 for a random-crawl sample (the classifier's negatives, `labelled_crawl(..., seed=1,
    pairs=5)`), and the rest for the crawl to curate."""
    pages = sorted(english)
    random.Random(0).shuffle(pages)
    return pages[:140], pages[140:200], pages[200:]


def _near_copy(text: str, rng: random.Random, number: int) -> str:
    lines = text.split("\n")
    spots = [(i, j) for i, line in enumerate(lines) for j in range(len(line.split(" ")))]
    for i, j in rng.sample(spots, max(2, len(spots) // 100)):
        words = lines[i].split(" ")
        words[j] = rng.choice(("however", "really", "mostly", "often", "also", "then", "never"))
        lines[i] = " ".join(words)
    return "\n".join(lines + [f"Republished with permission as entry {number} of our reading list."])


def _salad(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return "\n".join(" ".join(words[i:i + 14]) for i in range(0, len(words), 14))


def _gibberish(rng: random.Random) -> str:
    letters = string.ascii_lowercase + "      "
    return "\n".join("".join(rng.choice(letters) for _ in range(rng.randint(60, 120))) for _ in range(rng.randint(4, 10)))


def _foreign(paragraph: str, rng: random.Random) -> str:
    sentences = [s.strip() + "." for s in paragraph.split(".") if s.strip()]
    return "\n".join(" ".join(rng.sample(sentences, len(sentences))) for _ in range(3))


def labelled_crawl(english: list[str], seed: int = 0, pairs: int = 20) -> list[dict]:
    """Records {"id", "text", "label", "pair", "shard"} from `english` pages (each used once); `pair` is
    the pair's name for `exact`/`near` pages, "" otherwise."""
    rng = random.Random(seed)
    pages = list(english)
    rng.shuffle(pages)
    long_pages = [p for p in pages if len(p.split()) >= 300]
    pair_pages = long_pages[:2 * pairs]
    if len(pair_pages) < 2 * pairs:
        raise ValueError(f"labelled_crawl: {2 * pairs} pages of >= 300 words needed, {len(pair_pages)} given")
    singles = [p for p in pages if p not in pair_pages]
    records = []

    def add(label: str, text: str, pair: str = "", shard: int | None = None) -> None:
        records.append({"id": f"{label}/{len(records)}", "text": text, "label": label, "pair": pair,
                        "shard": rng.randrange(4) if shard is None else shard})

    if len(singles) < 45:
        raise ValueError(f"labelled_crawl: {2 * pairs + 45} pages needed, {len(pages)} given")
    for i, page in enumerate(singles[:-35]):
        add("good", page + ("\n" + "\n".join(FOOTER) if i % 3 == 0 else ""))
    for page in singles[-35:-15]:
        add("salad", _salad(page, rng))
    for i, page in enumerate(pair_pages[:pairs]):
        shard = rng.randrange(4)
        add("exact", page, f"exact{i}", shard)
        add("exact", page, f"exact{i}", (shard + 1 + rng.randrange(3)) % 4)
    for i, page in enumerate(pair_pages[pairs:]):
        add("near", page, f"near{i}")
        add("near", _near_copy(page, rng, i), f"near{i}")
    for i in range(10):
        add("gibberish", _gibberish(rng))
    for lang, paragraph in sorted(NON_ENGLISH.items()):
        for _ in range(2):
            add("non_english", _foreign(paragraph, rng))
    for page in singles[-15:]:
        add("short", " ".join(page.split()[:rng.randint(8, 30)]))
    rng.shuffle(records)
    return records


def page_url(page_id: str) -> str:
    return f"https://crawl.example/{page_id}"


def write_crawl(records: list[dict], directory: str | Path, shards: int = 4) -> None:
    """Gzipped JSONL shards `crawl-K.jsonl.gz` holding {"id", "url", "text"}, as an extracted CommonCrawl
    dump has them (the labels stay with the caller)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        lines = [json.dumps({"id": r["id"], "url": page_url(r["id"]), "text": r["text"]}, ensure_ascii=False) + "\n"
                 for r in records if r["shard"] % shards == shard]
        with gzip.open(directory / f"crawl-{shard}.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.writelines(lines)


def keep_metrics(records: list[dict], kept: dict[str, str]) -> dict:
    """Survivors per label, pairs by number of survivors, precision/recall of keep, and how many kept
    texts (`kept`: id -> curated text) still hold the boilerplate footer (line dedup leaves one)."""
    kept_ids = set(kept)
    per_label: dict[str, list[int]] = {}
    for r in records:
        total_kept = per_label.setdefault(r["label"], [0, 0])
        total_kept[0] += 1
        total_kept[1] += r["id"] in kept_ids
    pairs: dict[str, dict[str, int]] = {}
    survivors: dict[str, int] = {}
    for r in records:
        if r["pair"]:
            survivors[r["pair"]] = survivors.get(r["pair"], 0) + (r["id"] in kept_ids)
    for name, count in survivors.items():
        label = next(lab for lab in PAIR_LABELS if name.startswith(lab))
        row = pairs.setdefault(label, {"pairs": 0, "one": 0, "both": 0, "none": 0})
        row["pairs"] += 1
        row[{0: "none", 1: "one", 2: "both"}[count]] += 1
    good_total, good_kept = per_label.get("good", [0, 0])
    wanted = good_total + len(survivors)
    recalled = good_kept + sum(count > 0 for count in survivors.values())
    kept_count = sum(r["id"] in kept_ids for r in records)
    return {"labels": {label: {"pages": t, "kept": k} for label, (t, k) in sorted(per_label.items())},
            "pairs": pairs, "recall": recalled / wanted if wanted else 0.0,
            "precision": recalled / kept_count if kept_count else 0.0, "kept": kept_count,
            "footers_left": sum(FOOTER[0] in text for text in kept.values())}


def format_metrics(metrics: dict) -> str:
    lines = ["| label | pages | kept |", "|---|---|---|"]
    lines += [f"| {label} | {row['pages']} | {row['kept']} |" for label, row in metrics["labels"].items()]
    for label, row in sorted(metrics["pairs"].items()):
        lines.append(f"\n{label} pairs: {row['one']}/{row['pairs']} with exactly one copy kept "
                     f"({row['both']} both, {row['none']} none)")
    lines.append(f"keep: precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}; "
                 f"boilerplate footer left in {metrics['footers_left']} kept page(s)")
    return "\n".join(lines)


def mixture_documents(mixture_dir: str | Path) -> dict[str, str]:
    """id -> text of every document in a curated mixture's shards."""
    kept = {}
    for shard in sorted(Path(mixture_dir).glob("shard-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            kept[record["id"]] = record["text"]
    return kept
