"""KenLM perplexity buckets, as CCNet: score each page, bucket it by two perplexity cutoffs, keep chosen
buckets. Lower perplexity = closer to the reference text = "head".

`KenLMScorer` annotates every page with its perplexity; `PerplexityBucketFilter` labels it head/middle/
tail and keeps the configured buckets. The cutoffs are fixed numbers (CCNet's `cutoff.csv`: computed once
when the models are trained, `train-quality-models` writes them), so a page's bucket does not depend on
the rest of the run. Only with `quality.corpus_percentiles` are they the run's own percentiles, which
`PerplexityCutoffs` (one task, after scoring) computes into a file the filter reads.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from llama_jax.curate.errors import CurateError
from llama_jax.curate.models import require_file
from llama_jax.curate.normalize import normalized_lines
from llama_jax.utils.files import write_atomically

BUCKETS = ("head", "middle", "tail")


class PerplexityModel:
    """SentencePiece + KenLM: the perplexity of a text under the 5-gram model, per SentencePiece token."""

    def __init__(self, kenlm_path: str, sentencepiece_path: str):
        import kenlm
        import sentencepiece

        self.lm = kenlm.Model(str(require_file(kenlm_path, "models.kenlm")))
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(require_file(sentencepiece_path,
                                                                                   "models.sentencepiece")))

    def perplexity(self, text: str) -> float:
        """10 ** (-log10 P(text) / tokens), each line scored as a sentence (with its end token)."""
        log10_prob, tokens = 0.0, 0
        for line in normalized_lines(text):
            pieces = self.sp.encode(line, out_type=str)
            log10_prob += self.lm.score(" ".join(pieces), bos=True, eos=True)
            tokens += len(pieces) + 1
        return 10 ** (-log10_prob / tokens) if tokens else math.inf


class KenLMScorer(PipelineStep):
    name = "📉 KenLM perplexity"
    type = "📊 - STATS"

    def __init__(self, kenlm_path: str, sentencepiece_path: str):
        super().__init__()
        self.kenlm_path, self.sentencepiece_path = kenlm_path, sentencepiece_path

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        model = PerplexityModel(self.kenlm_path, self.sentencepiece_path)
        for doc in data or ():
            with self.track_time():
                doc.metadata["perplexity"] = model.perplexity(doc.text)
            yield doc


class PerplexityCutoffs(PipelineStep):
    """Consumes every scored page (run with one task) and writes {"cutoffs": [p_low, p_high]}."""

    name = "📏 perplexity percentiles"
    type = "📊 - STATS"

    def __init__(self, output_file: str, percentiles: list[float]):
        super().__init__()
        self.output_file, self.percentiles = output_file, list(percentiles)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import numpy as np

        scores = [doc.metadata["perplexity"] for doc in data or ()]
        finite = [s for s in scores if math.isfinite(s)]
        cutoffs = np.percentile(finite, self.percentiles).tolist() if finite else [math.inf, math.inf]
        write_atomically(self.output_file, json.dumps({"cutoffs": cutoffs, "pages": len(scores)}).encode())
        yield from ()  # a sink: the pages were only read for their scores


def bucket_of(perplexity: float, cutoffs: list[float]) -> str:
    if perplexity <= cutoffs[0]:
        return "head"
    return "middle" if perplexity <= cutoffs[1] else "tail"


class PerplexityBucketFilter(BaseFilter):
    """Buckets by `cutoffs` (two numbers) or, for corpus percentiles, by the ones in `cutoffs_file`."""

    name = "🪣 perplexity buckets"

    def __init__(self, keep_buckets: list[str], cutoffs: tuple[float, float] | None = None,
                 cutoffs_file: str | None = None):
        super().__init__()
        self.cutoffs_file, self.keep_buckets = cutoffs_file, tuple(keep_buckets)
        self._cutoffs = list(cutoffs) if cutoffs is not None else None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._cutoffs is None:
            path = Path(self.cutoffs_file)
            if not path.is_file():
                raise CurateError(f"{path}: perplexity cutoffs missing (the cutoffs phase did not run)")
            self._cutoffs = json.loads(path.read_text())["cutoffs"]
        bucket = bucket_of(doc.metadata["perplexity"], self._cutoffs)
        doc.metadata["bucket"] = bucket
        return True if bucket in self.keep_buckets else (False, bucket)
