"""The quality stage's perplexity cutoffs as a file: written by `train-quality-models` beside the models,
read (strictly) when a run is planned.

CCNet ships its head/middle/tail cutoffs with its language models (`cutoff.csv`): computed once on a
sample, then applied as fixed numbers, so a page's bucket never depends on what else is being filtered.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from llama_jax.curate.errors import CurateError
from llama_jax.utils.files import write_atomically

CUTOFFS_FILE = "cutoffs.json"


def write_cutoffs(path: Path, cutoffs: tuple[float, float], basis: str, percentiles: list[float], pages: int) -> None:
    record = {"cutoffs": list(cutoffs), "percentiles": list(percentiles), "basis": basis, "pages": pages}
    write_atomically(path, json.dumps(record, indent=1).encode())


def read_cutoffs(path: str | Path, key: str = "models.cutoffs") -> tuple[float, float]:
    """(head, middle) upper perplexity bounds from `path`; any defect is a CurateError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CurateError(f"{key}: perplexity cutoffs file {path} does not exist (train-quality-models writes "
                          f"it beside kenlm.bin; or set quality.cutoffs=[HEAD, MIDDLE])")
    try:
        cutoffs = json.loads(path.read_text(encoding="utf-8"))["cutoffs"]
        head, middle = (float(c) for c in cutoffs)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CurateError(f"{path}: not a cutoffs file ({e!r}); expected {{\"cutoffs\": [HEAD, MIDDLE]}}") from None
    if not (math.isfinite(head) and math.isfinite(middle) and 0 < head <= middle):
        raise CurateError(f"{path}: cutoffs must be two increasing positive perplexities, got {cutoffs}")
    return head, middle
