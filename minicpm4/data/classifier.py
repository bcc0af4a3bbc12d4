"""UltraClean's fastText quality classifier: training with the paper's defaults, scoring, save/load.

The classifier is a linear model over hashed word n-grams of the preprocessed text (see preprocessing.py):
dim 256, lr 0.1, word n-grams up to 3, minCount 5, 3 epochs (MiniCPM4 report, p. 12). It predicts two
labels, `__label__pos` and `__label__neg`; the quality score of a document is P(pos), and the filter
keeps documents with score >= 0.5 by default.

A model is the fastText `.bin` plus a sidecar `<model>.json` naming the tokenizer used in preprocessing
(the filter must tokenize exactly as training did), the hyperparameters and the held-out report.
Both are written atomically. A `.bin` without sidecar (e.g. a released UltraClean model) loads with
the default tokenizer.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from minicpm4.children import wrap
from minicpm4.data.preprocessing import Preprocessor
from minicpm4.errors import ConfigError
from minicpm4.fileio import atomic_write, atomic_write_text

POS, NEG = "__label__pos", "__label__neg"


@dataclass
class TrainParams:
    """fastText supervised hyperparameters; defaults are the paper's."""
    dim: int = 256
    lr: float = 0.1
    word_ngrams: int = 3
    min_count: int = 5
    epoch: int = 3
    bucket: int = 2_000_000  # hashed n-gram rows (fastText's default): the model is ~bucket * dim * 4 bytes
    threads: int = 1  # 1 = reproducible for a given seed; more threads train faster but not bit-exactly
    seed: int = 0


@dataclass
class Report:
    """Held-out metrics at a threshold: positives are the --pos documents."""
    n_train: int
    n_heldout: int
    threshold: float
    precision: float
    recall: float
    f1: float
    accuracy: float

    def lines(self) -> str:
        return (f"held-out {self.n_heldout} docs (trained on {self.n_train}) at threshold {self.threshold}: "
                f"precision {self.precision:.3f}  recall {self.recall:.3f}  f1 {self.f1:.3f}  "
                f"accuracy {self.accuracy:.3f}")


class QualityClassifier:
    """A loaded fastText model + its preprocessor; `scores(texts)` gives P(pos) per raw text."""

    def __init__(self, model, preprocessor: Preprocessor, meta: dict | None = None):
        self.model = model
        self.preprocessor = preprocessor
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityClassifier:
        import fasttext

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"classifier {path}: no such file")
        try:
            model = fasttext.load_model(str(path))
        except ValueError as e:
            raise ConfigError(f"classifier {path}: not a fastText model ({e})") from None
        if POS not in model.labels:
            raise ConfigError(f"classifier {path}: has labels {model.labels}, needs {POS}")
        sidecar = Path(f"{path}.json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        return cls(model, Preprocessor(meta.get("tokenizer")), meta)

    def scores(self, texts: list[str]) -> list[float]:
        return self.scores_preprocessed(self.preprocessor.batch(texts))

    def scores_preprocessed(self, lines: list[str]) -> list[float]:
        labels, probs = self.model.predict(lines, k=-1)
        return [float(dict(zip(ls, ps)).get(POS, 0.0)) for ls, ps in zip(labels, probs)]

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        atomic_write(path, lambda tmp: self.model.save_model(str(tmp)))
        atomic_write_text(Path(f"{path}.json"), json.dumps(self.meta, indent=2))


def split_heldout(pos: list[str], neg: list[str], heldout: float, seed: int):
    """Shuffle (label, text) pairs with `seed` and cut the last `heldout` fraction off as the test set."""
    pairs = [(POS, t) for t in pos] + [(NEG, t) for t in neg]
    random.Random(seed).shuffle(pairs)
    n_test = int(round(len(pairs) * heldout))
    return pairs[:len(pairs) - n_test], pairs[len(pairs) - n_test:]


def train_classifier(pos: Iterable[str], neg: Iterable[str], out: str | os.PathLike,
                     params: TrainParams | None = None, heldout: float = 0.1, threshold: float = 0.5,
                     tokenizer: str | None = None) -> Report:
    """Train on preprocessed pos/neg texts, report held-out precision/recall, save model + sidecar."""
    params = params or TrainParams()
    pos, neg = list(pos), list(neg)
    if not pos or not neg:
        raise ConfigError(f"training needs positive and negative documents (got {len(pos)} pos, {len(neg)} neg)")
    pre = Preprocessor(tokenizer)
    train, test = split_heldout(pos, neg, heldout, params.seed)
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        with open(train_file, "w", encoding="utf-8") as f:
            for (label, _), line in zip(train, pre.batch([t for _, t in train])):
                f.write(f"{label} {line}\n")
        model = _train_file(train_file, params)
    clf = QualityClassifier(model, pre)
    report = evaluate(clf, test, threshold, n_train=len(train))
    clf.meta = {"tokenizer": pre.tokenizer, "params": asdict(params), "report": asdict(report)}
    clf.save(out)
    return report


_FIT = ("import json, sys, fasttext; "
        "fasttext.train_supervised(input=sys.argv[1], verbose=0, **json.loads(sys.argv[2])).save_model(sys.argv[3])")


def _train_file(train_file: Path, params: TrainParams):
    """Train in a fresh Python process (importing only fasttext) and load the result.

    fastText 0.9.2 (the numpy-2 wheel) reports "Encountered NaN" at lr 0.1 and a fixed seed on every run
    once the process has run a `tokenizers` encode_batch (reused heap memory, it seems), while the same
    file and params train cleanly in a fresh process. A `python -c` child starts clean and, unlike
    multiprocessing's spawn, needs no `if __name__ == "__main__"` guard in the caller's script."""
    import fasttext

    model_file = str(train_file.with_suffix(".bin"))
    args = dict(dim=params.dim, lr=params.lr, wordNgrams=params.word_ngrams, minCount=params.min_count,
                epoch=params.epoch, bucket=params.bucket, thread=params.threads, seed=params.seed)
    run = subprocess.run(wrap([sys.executable, "-c", _FIT, str(train_file), json.dumps(args), model_file]),
                         capture_output=True, text=True)  # wrap: it dies with us (children.py)
    if run.returncode != 0:
        err = (run.stderr.strip().splitlines() or ["no output"])[-1]
        if "NaN" in err:
            raise ConfigError(f"fastText training diverged (NaN) at lr {params.lr}; lower --lr")
        raise ConfigError(f"fastText training failed: {err}")
    return fasttext.load_model(model_file)


def evaluate(clf: QualityClassifier, labelled: list[tuple[str, str]], threshold: float = 0.5,
             n_train: int = 0) -> Report:
    """Precision/recall of `score >= threshold` against the labels (POS = relevant)."""
    scores = clf.scores([t for _, t in labelled]) if labelled else []
    tp = sum(s >= threshold and lab == POS for (lab, _), s in zip(labelled, scores))
    fp = sum(s >= threshold and lab == NEG for (lab, _), s in zip(labelled, scores))
    fn = sum(s < threshold and lab == POS for (lab, _), s in zip(labelled, scores))
    tn = len(labelled) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (tp + tn) / len(labelled) if labelled else 0.0
    return Report(n_train, len(labelled), threshold, precision, recall, f1, accuracy)
