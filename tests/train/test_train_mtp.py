"""Multi-token prediction heads: they learn, sit in the muP groups, resume exactly, and stay out of the HF export."""

import pytest
import torch
from train_util import TINY_MODEL, make_shards, small_tokenizer, tiny_config

import minicpm4
from minicpm4.config import ModelConfig, preset
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.train.linear_cross_entropy import IGNORE
from minicpm4.train.metrics import read_metrics
from minicpm4.train.mtp import attach, mtp_labels
from minicpm4.train.mup import param_groups
from minicpm4.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_text):
    return make_shards(tmp_path_factory.mktemp("mtp"), real_text, small_tokenizer(real_text))


def test_mtp_labels_shift_and_respect_documents():
    labels = torch.tensor([[10, 11, 12, 13, 14, 15]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert mtp_labels(labels, None, 2).tolist() == [[12, 13, 14, 15]]
    # position i predicts token i+3 (= labels[i+2]); i and i+2 must be in one document
    assert mtp_labels(labels, segments, 2).tolist() == [[12, IGNORE, IGNORE, 15]]


def test_mtp_parameters_land_in_mup_groups():
    mc = ModelConfig.from_dict({**preset("tiny").to_dict(), **TINY_MODEL, "vocab_size": 300})
    model = MiniCPM4ForCausalLM(mc)
    head = attach(model, 2, 0.1, True, seed=0)
    groups = param_groups(model, 0.01, 0.1)  # asserts every parameter is in exactly one group
    role = {id(p): g for g in groups for p in g["params"]}
    m = mc.hidden_size / mc.dim_model_base
    proj = head.layers[1].proj.weight
    assert proj.shape == (64, 128) and role[id(proj)]["role"] == "matrix"
    assert role[id(proj)]["base_lr"] == pytest.approx(0.01 / m)
    assert proj.std().item() == pytest.approx(0.1 / m ** 0.5, rel=0.15)  # muP init of a hidden matrix
    assert role[id(head.layers[0].block.mlp.down_proj.weight)]["role"] == "matrix"
    assert role[id(head.layers[0].embed_norm.weight)]["role"] == "vector"
    assert len({id(p) for p in head.parameters()} - set(role)) == 0


def test_mtp_trains_resumes_and_exports_the_main_model_only(shards, tmp_path):
    kw = dict(mtp_depth=2, mtp_weight=0.5, lr=0.05, steps=8, warmup_steps=1, decay_steps=2)
    full = train(tiny_config(shards, tmp_path / "full", **kw))
    recs = read_metrics(tmp_path / "full" / "metrics.jsonl")
    mtp = [r["mtp_loss"] for r in recs]
    assert len(mtp) == 8 and max(mtp[-2:]) < mtp[0] - 0.5  # the heads learn
    train(tiny_config(shards, tmp_path / "part", **kw), stop_after=3)
    train(tiny_config(shards, tmp_path / "part", **kw), resume=str(tmp_path / "part"))
    part = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [(r["loss"], r["mtp_loss"]) for r in part] == [(r["loss"], r["mtp_loss"]) for r in recs]  # bitwise
    # the exported directory is the plain model: it loads (no stray mtp.* tensors) and equals the resumed run's
    a, _ = minicpm4.load(full["checkpoint"] / "model", dtype="fp32")
    b, _ = minicpm4.load(tmp_path / "part" / "checkpoints" / "step_0000008" / "model", dtype="fp32")
    assert not hasattr(a, "mtp") and all(not k.startswith("mtp.") for k in a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    state = torch.load(full["checkpoint"] / "state.pt", weights_only=True)
    assert sorted(state["mtp"]) and all(k.startswith("mtp.layers.") for k in state["mtp"])
    with pytest.raises(CheckpointError, match=r"mtp_depth \(2 -> 0\)"):  # MTP state cannot continue as a plain run
        train(tiny_config(shards, tmp_path / "part", **{**kw, "mtp_depth": 0}), resume=str(full["checkpoint"]))


def test_weightless_mtp_leaves_the_main_model_unchanged(shards, tmp_path):
    """mtp_weight=0: the heads run and get zero gradients, so the main model (and its export) is the plain run's."""
    kw = dict(lr=0.05, steps=3, warmup_steps=1, decay_steps=1)
    plain = train(tiny_config(shards, tmp_path / "plain", **kw))
    heads = train(tiny_config(shards, tmp_path / "heads", mtp_depth=1, mtp_weight=0.0, **kw))
    assert [r["loss"] for r in read_metrics(tmp_path / "heads" / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    a, _ = minicpm4.load(plain["checkpoint"] / "model", dtype="fp32")
    b, _ = minicpm4.load(heads["checkpoint"] / "model", dtype="fp32")
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_mtp_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="mtp_depth must be in"):
        tiny_config(tmp_path, tmp_path / "r", mtp_depth=-1)
    with pytest.raises(ConfigError, match="needs parallel=ddp"):
        tiny_config(tmp_path, tmp_path / "r", mtp_depth=1, parallel="fsdp")
