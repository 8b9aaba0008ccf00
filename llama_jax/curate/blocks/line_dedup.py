"""Line dedup's last phase: datatrove's filter removes every line seen earlier in the source, then each
page is judged on what is left.

datatrove keeps a page that lost no line whatever its length, and judges a page that lost some only by its
remaining words. Here every page goes through the same two rules: at least `min_words` words (Gopher's 50;
shorter pages are navigation, link lists and fragments), and at least `min_kept_share` of its characters
kept (a page most of whose text was found elsewhere is a template filled with little, or a copy MinHash
did not catch; its remainder is a fragment that would otherwise pass the later stages as clean text).
"""
from __future__ import annotations

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.sentence_dedup import SentDedupConfig, SentenceDedupFilter

from llama_jax.curate.blocks.words import WhitespaceTokenizer


class LineDedupFilter(PipelineStep):
    type = "🫂 - DEDUPS"
    name = "💥 line dedup + what is left"

    def __init__(self, duplicates_folder: str, config: SentDedupConfig, min_words: int, min_kept_share: float):
        super().__init__()
        self.dedup = SentenceDedupFilter(duplicates_folder, config=config, language=WhitespaceTokenizer())
        self.min_words, self.min_kept_share = min_words, min_kept_share

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        chars_in = {}

        def measured():
            # datatrove's filter consumes one page and yields it (or not) before taking the next, so the
            # last length recorded is the length of the page it yields.
            for doc in data or ():
                chars_in["last"] = len(doc.text)
                yield doc

        for doc in self.dedup.run(measured(), rank, world_size):
            self.stat_update("total")
            if len(doc.text.split()) < self.min_words:
                self.stat_update("dropped_too_short")
            elif len(doc.text) < self.min_kept_share * chars_in["last"]:
                self.stat_update("dropped_mostly_duplicate")
            else:
                self.stat_update("forwarded")
                yield doc
