"""fastText filters on local model files: language ID (lid.176) and the Wikipedia-reference classifier.

datatrove's `FastTextClassifierFilter` does the scoring and filtering; this subclass only loads the model
from the given path directly, where datatrove would copy it into a download cache keyed by path (and
keep serving a stale copy after the model file is retrained in place).
"""
from __future__ import annotations

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
