"""TrainConfig checks (fail before compute), the WSD schedule at chosen steps, muP groups and init scales."""

import math
import subprocess
import sys

import pytest
import torch
from train_util import TINY_MODEL, tiny_config

from minicpm4.config import ModelConfig
from minicpm4.errors import ConfigError
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.train.mup import init_weights, param_groups
from minicpm4.train.schedule import wsd_factor
from minicpm4.train.train_config import TrainConfig
from minicpm4.train.trainer import train


def test_unknown_key_is_named(tmp_path):
    (tmp_path / "c.json").write_text('{"data": "x", "learning_rate": 0.1}')
    with pytest.raises(ConfigError, match=r"c.json: unknown key\(s\) learning_rate"):
        TrainConfig.load(tmp_path / "c.json")


@pytest.mark.parametrize("override, message", [
    ("lr=-0.01", "lr must be positive, got -0.01"),
    ("warmup_steps=80", r"warmup_steps \(80\) \+ decay_steps \(10\) exceed steps \(50\)"),
    ("dtype=fp16", "fp16 is pathologically slow on CPU"),
    ("micro_batch_size=3", r"batch_size \(8\) must be a multiple of micro_batch_size \(3\)"),
    ("decay_shape=step", "decay_shape must be one of exponential, linear, cosine"),
    ("steps=ten", "steps must be a int, got 'ten'"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, ["data=x", "steps=50", override])


def test_inconsistent_values_fail_before_any_compute(tmp_path, real_text):
    from train_util import make_shards, small_tokenizer
    shards = make_shards(tmp_path, real_text, small_tokenizer(real_text))
    sparse = dict(TINY_MODEL, sparse_config={"dense_len": 64, "block_size": 16, "kernel_size": 8,
                                             "kernel_stride": 4, "window_size": 32, "topk": 2})
    cfg = tiny_config(shards, tmp_path / "run", seq_len=32, model_overrides=sparse)
    with pytest.raises(ConfigError, match=r"sparse_config.dense_len \(64\) >= seq_len \(32\)"):
        train(cfg)
    cfg = tiny_config(shards, tmp_path / "run", seq_len=1024)
    with pytest.raises(ConfigError, match=r"seq_len \(1024\) exceeds the model's max_position_embeddings \(512\)"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


def test_cli_reports_config_error_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minicpm4.cli", "train", "pretrain", "--set", "data=x",
                        "--set", "lr=-1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: config: lr must be positive, got -1.0"


def test_wsd_values_at_chosen_steps():
    f = lambda s, shape="exponential": wsd_factor(s, 100, 10, 20, shape, 0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == 1.0  # warmup (s+1)/10
    assert f(10) == 1.0 and f(79) == 1.0  # stable
    # decay over steps 80..99: p = (s - 80 + 1) / 20
    assert f(89) == pytest.approx(0.1 ** 0.5) and f(99) == pytest.approx(0.1)
    assert f(89, "linear") == pytest.approx(1 - 0.9 * 0.5) and f(99, "linear") == pytest.approx(0.1)
    assert f(84, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(99, "cosine") == pytest.approx(0.1)


def mup_model(width: int) -> MiniCPM4ForCausalLM:
    cfg = ModelConfig(vocab_size=300, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, dim_model_base=32, scale_emb=12,
                      scale_depth=1.4, tie_word_embeddings=False)
    return MiniCPM4ForCausalLM(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_mup_groups_cover_every_parameter_once(tied):
    model = mup_model(64)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    groups = param_groups(model, lr=0.01, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    roles = {g["role"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in roles["embedding"]["params"]} == {"model.embed_tokens.weight"}
    assert all(n.endswith(("proj.weight",)) for n in (names[id(p)] for p in roles["matrix"]["params"]))
    assert all(n.endswith("norm.weight") for n in (names[id(p)] for p in roles["vector"]["params"]))
    assert ("head" in roles) == (not tied) and roles["vector"]["weight_decay"] == 0.0


def test_mup_scales_lr_and_init_with_width():
    torch.manual_seed(0)
    rates, stds = {}, {}
    for width in (64, 256):
        model = mup_model(width)
        init_weights(model, init_std=0.1)
        rates[width] = {g["role"]: g["lr"] for g in param_groups(model, lr=0.01, weight_decay=0.0)}
        stds[width] = {"matrix": model.model.layers[0].mlp.up_proj.weight.std().item(),
                       "embedding": model.model.embed_tokens.weight.std().item()}
        assert model.model.norm.weight.eq(1).all()
    # m = width / 32: matrices lr / m and std 0.1 / sqrt(m); embedding and head at the base values
    assert rates[64]["matrix"] == pytest.approx(0.01 / 2) and rates[256]["matrix"] == pytest.approx(0.01 / 8)
    assert rates[64]["embedding"] == rates[256]["embedding"] == rates[256]["head"] == rates[256]["vector"] == 0.01
    assert stds[64]["matrix"] == pytest.approx(0.1 / math.sqrt(2), rel=0.03)
    assert stds[256]["matrix"] == pytest.approx(0.1 / math.sqrt(8), rel=0.03)
    assert stds[64]["embedding"] == pytest.approx(0.1, rel=0.03) == stds[256]["embedding"]


def test_each_task_has_its_defaults_and_its_section():
    qat = TrainConfig.load(None, ["steps=100", "model=m"], task="qat")
    assert (qat.lr, qat.warmup_steps, qat.decay_steps, qat.decay_shape, qat.min_lr_ratio, qat.weight_decay) == \
        (2e-3, 20, 20, "linear", 0.1, 0.0)  # re-warmup, then linear decay over the last 20%
    assert (qat.batch_size, qat.micro_batch_size, qat.seq_len, qat.eval_every, qat.qat.mode) == \
        (8, 8, 128, 50, "ternary")
    draft = TrainConfig.load(None, ["data=[\"a.txt\", \"b.txt\"]", "draft.max_windows=8"], task="draft")
    assert draft.data == ["a.txt", "b.txt"] and draft.draft.max_windows == 8
    assert draft.to_dict()["draft"]["ce_weight"] == 0.1
    pre = TrainConfig.load(None, ["data=x"])
    assert (pre.lr, pre.decay_shape, pre.eval_every) == (1e-2, "exponential", 0)  # pretraining's, unchanged


@pytest.mark.parametrize("task, override, message", [
    ("qat", "qat.mode=int8", "qat.mode must be one of ternary, int4, float, got 'int8'"),
    ("qat", "qat.bits=4", r"unknown key\(s\) qat.bits"),
    ("qat", "qat.group_size=64.5", "qat.group_size must be a int, got 64.5"),
    ("draft", "draft.target_dtype=int8", "draft.target_dtype must be bf16, fp32 or fp16"),
    ("pretrain", 'data=["a", "b"]', "data: a list of files is for task draft"),
    ("qat", "decay_steps=300", r"decay_steps \(300\) exceed steps \(200\)"),
])
def test_bad_task_settings_are_rejected(task, override, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, ["data=x", override], task=task)
