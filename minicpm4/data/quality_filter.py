"""The UltraClean classifier as a datatrove filter step.

Scores each document with P(pos) of the fastText classifier on the *preprocessed* text (datatrove's
FastTextClassifierFilter would score raw text, which the classifier never saw in training), stores it
in `metadata["quality_score"]`, keeps score >= threshold (0.5 by default, as in the paper) and drops the
rest with reason `low_quality` (written to `exclusion_writer` if given). Documents are scored in
batches: one tokenizer `encode_batch` and one fastText `predict` call per batch.
"""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

SCORE_KEY = "quality_score"


class QualityFilter(BaseFilter):
    name = "🧼 UltraClean fastText"

    def __init__(self, model_path: str, threshold: float = 0.5, exclusion_writer: DiskWriter | None = None,
                 batch_size: int = 256):
        super().__init__(exclusion_writer, batch_size=batch_size)
        self.model_path = str(model_path)
        self.threshold = threshold
        self._classifier = None  # loaded in the worker: fastText models do not pickle

    @property
    def classifier(self):
        if self._classifier is None:
            from minicpm4.data.classifier import QualityClassifier  # fastText, loaded per worker
            self._classifier = QualityClassifier.load(self.model_path)
        return self._classifier

    def __getstate__(self):
        return {**self.__dict__, "_classifier": None}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        scores = self.classifier.scores([d.text for d in batch])
        out = []
        for doc, score in zip(batch, scores):
            doc.metadata[SCORE_KEY] = round(score, 6)
            out.append(True if score >= self.threshold else (False, "low_quality"))
        return out
