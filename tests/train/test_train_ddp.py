"""The same entry point under torchrun: two CPU processes (DDP or FSDP2, gloo) follow the loss curve of one process
with the same global batch, and write one checkpoint that equals the single process's weights."""

import json
import subprocess
import sys

import pytest
import torch
from train_util import make_shards, small_tokenizer, tiny_config

import minicpm4
from minicpm4.train.metrics import read_metrics
from minicpm4.train.trainer import train


@pytest.mark.parametrize("parallel,mtp", [("ddp", 0), ("fsdp", 0), ("ddp", 2)])
def test_two_processes_equal_one(tmp_path, real_text, parallel, mtp):
    """mtp=2: the multi-token-prediction heads run outside DDP's forward; their gradients are averaged all the same."""
    shards = make_shards(tmp_path, real_text, small_tokenizer(real_text))
    # FSDP2 runs the plain loss (lm_head is sharded outside forward): the single process does too
    kw = dict(steps=4, warmup_steps=1, decay_steps=1, batch_size=4, micro_batch_size=2, parallel=parallel,
              fused_loss=parallel == "ddp", mtp_depth=mtp)
    train(tiny_config(shards, tmp_path / "one", **kw))  # one process: 2 micro-batches of 2 per step
    cfg = tiny_config(shards, tmp_path / "two", **kw)  # two processes: one micro-batch of 2 each
    sets = [a for k, v in cfg.to_dict().items() if k != "task" for a in ("--set", f"{k}={json.dumps(v)}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minicpm4.cli", "train", "pretrain", *sets]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    two = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    if mtp:
        one += [m["mtp_loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl")]
        two += [m["mtp_loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(two) == 4 * (1 + bool(mtp)) and two == pytest.approx(one, abs=1e-6)
    assert one[0] != one[-1]  # the runs really trained
    a, _ = minicpm4.load(tmp_path / "one" / "checkpoints" / "step_0000004" / "model", dtype="fp32")
    b, _ = minicpm4.load(tmp_path / "two" / "checkpoints" / "step_0000004" / "model", dtype="fp32")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)
