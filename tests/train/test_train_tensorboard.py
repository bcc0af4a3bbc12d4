"""TensorBoard logging: the event file holds the metrics.jsonl values; a missing package is a clear config error."""

import sys

import pytest
from train_util import make_shards, small_tokenizer, tiny_config

from minicpm4.errors import ConfigError
from minicpm4.train.metrics import read_metrics
from minicpm4.train.trainer import train


def test_event_file_holds_the_logged_scalars(tmp_path, real_text):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    shards = make_shards(tmp_path, real_text, small_tokenizer(real_text))
    kw = dict(steps=4, warmup_steps=1, decay_steps=1, tensorboard=True)
    train(tiny_config(shards, tmp_path / "run", **kw), stop_after=2)
    train(tiny_config(shards, tmp_path / "run", **kw), resume=str(tmp_path / "run"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tok_per_s"} <= set(events.Tags()["scalars"])
    logged = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    for tag in ("loss", "lr"):
        got = {e.step: e.value for e in events.Scalars(f"train/{tag}")}  # both runs' event files, step 1..4
        assert sorted(got) == [1, 2, 3, 4]
        assert got == {s: pytest.approx(r[tag], rel=1e-6) for s, r in logged.items()}


def test_missing_package_is_named_before_any_compute(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec returns None
    with pytest.raises(ConfigError, match="needs the `tensorboard` package: pip install tensorboard"):
        tiny_config(tmp_path, tmp_path / "run", tensorboard=True)
