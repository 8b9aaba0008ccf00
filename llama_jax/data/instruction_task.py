"""A generated instruction task for trying fine-tuning on a CPU: "reverse the order of these words".

Chance is ~0 exact-match (the answer is a permutation of 3-5 words from a 24-word list), so a model that
reaches 90 % on held-out prompts has learnt to follow the instruction, not to guess. Records are in Alpaca
format; train, validation and test are drawn from one seeded generator with no input repeated across them.
`python train.py instruction-task DIR` writes DIR/{train,validation,test}.jsonl for
`configs/train/sft-tiny.yaml`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llama_jax.utils.files import write_atomically

WORDS = ("red", "blue", "green", "cat", "dog", "fish", "sun", "moon", "tree", "book", "door", "road",
         "milk", "bread", "apple", "stone", "river", "cloud", "table", "chair", "happy", "quick", "small", "big")
INSTRUCTION = "Reverse the order of these words."
SPLITS = {"train": 4000, "validation": 100, "test": 100}


def reverse_words_records(seed: int = 0) -> dict[str, list[dict]]:
    """{split: Alpaca records}; every input occurs once in all splits together."""
    rng = np.random.default_rng(seed)
    seen, out = set(), {split: [] for split in SPLITS}
    for split, count in SPLITS.items():
        while len(out[split]) < count:
            words = tuple(WORDS[i] for i in rng.choice(len(WORDS), size=rng.integers(3, 6), replace=False))
            if words in seen:
                continue
            seen.add(words)
            out[split].append({"instruction": INSTRUCTION, "input": " ".join(words),
                               "output": " ".join(reversed(words))})
    return out


def write_reverse_words(directory: str | Path, seed: int = 0) -> list[Path]:
    """Write DIR/{train,validation,test}.jsonl; returns their paths."""
    paths = []
    for split, records in reverse_words_records(seed).items():
        path = Path(directory) / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in records).encode())
        paths.append(path)
    return paths
