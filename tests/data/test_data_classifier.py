"""UltraClean fastText classifier: paper defaults, learning a separable task, held-out report, save/load."""

import json
from dataclasses import asdict

import pytest
from data_corpus import SCIENCE, SMALL, SPAM, sentences

from minicpm4.data.classifier import POS, QualityClassifier, TrainParams, evaluate, train_classifier
from minicpm4.errors import ConfigError


def test_defaults_are_the_papers():
    p = TrainParams()
    assert (p.dim, p.lr, p.word_ngrams, p.min_count, p.epoch) == (256, 0.1, 3, 5, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "model.bin"
    report = train_classifier(sentences(SCIENCE, 300, 1), sentences(SPAM, 300, 2), out, TrainParams(**SMALL))
    return out, report


def test_learns_a_separable_task(trained):
    out, report = trained
    assert report.n_heldout == 60 and report.n_train == 540
    assert report.precision == 1.0 and report.recall == 1.0
    clf = QualityClassifier.load(out)
    good, bad = clf.scores(sentences(SCIENCE, 50, 10)), clf.scores(sentences(SPAM, 50, 11))
    assert min(good) > 0.9 and max(bad) < 0.1
    # unseen mixtures land in between, ordered by how much science they hold
    mostly = clf.scores(["energy heat theory proof cell membrane molecule click"])[0]
    barely = clf.scores(["click buy cheap deal free shipping price energy"])[0]
    assert mostly > 0.5 > barely


def test_save_load_round_trip(trained, tmp_path):
    out, report = trained
    clf = QualityClassifier.load(out)
    meta = json.loads(out.with_name("model.bin.json").read_text())
    assert meta["tokenizer"] == "default" and meta["params"]["dim"] == SMALL["dim"]
    assert meta["report"] == asdict(report)
    texts = sentences(SCIENCE, 5, 20) + sentences(SPAM, 5, 21)
    copy = tmp_path / "copy.bin"
    clf.save(copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.bin", "copy.bin.json"]  # no temp files left
    assert QualityClassifier.load(copy).scores(texts) == clf.scores(texts)


def test_evaluate_counts(trained):
    clf = QualityClassifier.load(trained[0])
    labelled = [(POS, t) for t in sentences(SCIENCE, 10, 30)] + [("__label__neg", t) for t in sentences(SPAM, 10, 31)]
    r = evaluate(clf, labelled, threshold=1.01)  # nothing reaches the threshold: no positives predicted
    assert (r.precision, r.recall, r.accuracy) == (0.0, 0.0, 0.5)
    r = evaluate(clf, labelled, threshold=0.0)  # everything is predicted positive
    assert (r.precision, r.recall, r.accuracy) == (0.5, 1.0, 0.5)


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="0 neg"):
        train_classifier(["a"], [], tmp_path / "m.bin")
    with pytest.raises(ConfigError, match="no such file"):
        QualityClassifier.load(tmp_path / "missing.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a fastText model"):
        QualityClassifier.load(tmp_path / "junk.bin")
