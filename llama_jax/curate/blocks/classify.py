"""fastText filters on local model files: language ID (lid.176) and the Wikipedia-reference classifier.

datatrove's `FastTextClassifierFilter` would copy the model into a download cache keyed by path (and
keep serving a stale copy after the model file is retrained in place); this subclass loads the given
file directly. It also scores a page once for only the labels it keeps: asking fastText for all 176
languages' scores and keeping them all in the page's metadata made language ID 3-4 times slower and
every later stage's input larger.
"""
from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters.fasttext_filter import FastTextClassifierFilter

from llama_jax.curate.errors import CurateError
from llama_jax.curate.models import load_fasttext


class LocalFastTextFilter(FastTextClassifierFilter):
    name = "🤖 fastText (local model)"

    def __init__(self, model_path: str, keep_labels: list[tuple[str, float]]):
        super().__init__(model_url=model_path, keep_labels=keep_labels, newline_replacement=" ")

    @property
    def model(self):
        if self._model is None:
            model = load_fasttext(self.model_url)
            labels = {label.removeprefix("__label__") for label in model.labels}
            missing = [label for label, _ in self.keep_labels if label not in labels]
            if missing:
                raise CurateError(f"{self.model_url}: the model has no label {missing[0]!r} "
                                  f"(its labels: {sorted(labels)[:10]})")
            self._model = model
        return self._model

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep the page when a kept label scores at least its threshold; its scores go to metadata."""
        floor = min(score for _, score in self.keep_labels)
        labels, scores = self.model.predict(doc.text.replace("\n", self.newline_replacement), k=-1, threshold=floor)
        found = {label.removeprefix("__label__"): float(score) for label, score in zip(labels, scores)}
        kept = {label: found[label] for label, _ in self.keep_labels if label in found}
        doc.metadata.update(kept)
        return any(kept.get(label, -1.0) >= score for label, score in self.keep_labels)
