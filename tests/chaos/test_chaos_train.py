"""Training under abuse: kill -9 at random points (seeded) then resume, NaN injected into the forward pass, a
learning rate that diverges, a checkpoint whose weight bytes are garbage, leftovers of killed saves."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_util import make_shards, small_tokenizer, tiny_config

import minicpm4
from minicpm4.errors import CheckpointError
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.train.checkpoint import list_checkpoints, load_checkpoint
from minicpm4.train.guards import TrainingDiverged, rotation_victims
from minicpm4.train.metrics import read_metrics
from minicpm4.train.trainer import train

SEED = 20  # the kill points; a failure reproduces with the same seed


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_text):
    return make_shards(tmp_path_factory.mktemp("chaos_train"), real_text, small_tokenizer(real_text))


def strict_records(run: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (a bare NaN or Infinity is an error)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt)[2]


def corrupt_tensor_bytes(file: Path, name: str, seed: int) -> None:
    """Random bytes over one tensor's data in a safetensors file; the header stays valid."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    noise = random.Random(seed).randbytes(end - start)
    file.write_bytes(raw[:8 + n + start] + noise + raw[8 + n + end:])


def test_kill_9_at_random_points_then_resume_equals_uninterrupted(shards, tmp_path):
    rng = random.Random(SEED)
    cfg = dict(steps=24, save_every=1, keep_checkpoints=2)
    run = tmp_path / "run"
    args = [f"{k}={json.dumps(v)}" for k, v in tiny_config(shards, run, **cfg).to_dict().items() if k != "task"]
    base = [sys.executable, "-m", "minicpm4.cli", "train", "pretrain"] + [a for x in args for a in ("--set", x)]
    kills = 0
    for _ in range(2):
        cmd = base + (["--resume", str(run)] if list_checkpoints(run) else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = len(read_metrics(run / "metrics.jsonl")) if (run / "metrics.jsonl").is_file() else 0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # training (past start-up) before the clock starts
            if (run / "metrics.jsonl").is_file() and len(read_metrics(run / "metrics.jsonl")) > done:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere: mid-step, mid-save, between the rename and `latest`
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills, "the run finished before any kill; give it more steps"
    result = train(tiny_config(shards, run, **cfg), resume=str(run) if list_checkpoints(run) else None)
    ref = train(tiny_config(shards, tmp_path / "ref", **cfg))
    assert result["step"] == ref["step"] == 24
    assert [r["loss"] for r in strict_records(run)] == [r["loss"] for r in strict_records(tmp_path / "ref")]
    a, b = weights(result["checkpoint"]), weights(ref["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((run / "checkpoints").glob(".*.tmp")), "a killed save's temporary folder was left behind"
    assert len(list_checkpoints(run)) == 2


def inject_nan(at_calls: set[int]):
    """A global forward hook on the model: the listed forward calls (0-based, one per micro-batch) return NaN."""
    calls = [0]

    def hook(module, args, output):
        if not isinstance(module, MiniCPM4ForCausalLM):
            return None
        calls[0] += 1
        return output * float("nan") if calls[0] - 1 in at_calls else None
    return torch.nn.modules.module.register_module_forward_hook(hook)


def test_nan_step_stops_the_run_and_keeps_finite_checkpoints(shards, tmp_path):
    run = tmp_path / "run"
    handle = inject_nan({4})  # step 3's first micro-batch (two micro-batches per step)
    try:
        with pytest.raises(TrainingDiverged, match=r"step 3: loss nan .*skip_nonfinite_steps=0"):
            train(tiny_config(shards, run, steps=6, save_every=1, keep_checkpoints=2))
    finally:
        handle.remove()
    records = strict_records(run)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == "NaN"
    assert read_metrics(run / "metrics.jsonl")[-1]["loss"] != read_metrics(run / "metrics.jsonl")[-1]["loss"]  # nan
    assert [p.name for p in list_checkpoints(run)] == ["step_0000001", "step_0000002"]
    assert all(torch.isfinite(t).all() for t in weights(run / "checkpoints" / "step_0000002").values())
    # the run continues from its last good checkpoint
    assert train(tiny_config(shards, run, steps=6, save_every=1), resume=str(run))["step"] == 6


def test_skipped_nan_steps_leave_the_weights_alone(shards, tmp_path):
    run = tmp_path / "run"
    handle = inject_nan({4, 5})
    try:
        result = train(tiny_config(shards, run, steps=5, save_every=1, keep_checkpoints=5, skip_nonfinite_steps=1))
    finally:
        handle.remove()
    assert result["step"] == 5
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert [x != x for x in losses] == [False, False, True, False, False]
    ckpts = run / "checkpoints"
    two, three = weights(ckpts / "step_0000002"), weights(ckpts / "step_0000003")
    assert all(torch.equal(two[k], three[k]) for k in two)  # step 3 was not applied
    # a second bad step is one more than allowed
    handle = inject_nan({0, 2})
    try:
        with pytest.raises(TrainingDiverged, match="step 2:.*2 such step"):
            train(tiny_config(shards, tmp_path / "two", steps=5, skip_nonfinite_steps=1))
    finally:
        handle.remove()


def test_diverging_learning_rate_stops_with_a_clear_error(shards, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="not finite"):
        train(tiny_config(shards, run, lr=1e6, steps=10, save_every=1))
    assert strict_records(run)[-1]["loss"] == "NaN"
    for ckpt in list_checkpoints(run):
        assert all(torch.isfinite(t).all() for t in weights(ckpt).values())


def test_garbage_weights_in_latest_checkpoint_refuse_to_resume_and_keep_the_older(shards, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(shards, run, steps=6, save_every=2, keep_checkpoints=2), stop_after=4)
    latest = run / "checkpoints" / "step_0000004"
    corrupt_tensor_bytes(latest / "model" / "model.safetensors", "model.layers.1.mlp.down_proj.weight", SEED)
    with pytest.raises(CheckpointError, match=r"step_0000004.*model\.layers\.1\.mlp\.down_proj\.weight.*"
                                              r"other checkpoints kept: .*step_0000002"):
        train(tiny_config(shards, run, steps=6, save_every=2, keep_checkpoints=2), resume=str(run))
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    with pytest.raises(CheckpointError, match="down_proj"):
        minicpm4.load(latest / "model")


def test_stale_temporaries_are_removed_at_start(shards, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(shards, run, steps=6), stop_after=2)
    ckpts = run / "checkpoints"
    (ckpts / ".step_0000003.x1y2.tmp" / "model").mkdir(parents=True)
    (ckpts / ".step_0000003.x1y2.tmp" / "model" / "model.safetensors").write_bytes(b"half")
    (ckpts / ".latest.abc.tmp").write_text("step_0000003\n")
    train(tiny_config(shards, run, steps=6), resume=str(run), stop_after=3)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002", "step_0000003"]


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    names = [tmp_path / f"step_{s:07d}" for s in (2, 4, 9)]
    assert rotation_victims(names, 2, names[2]) == [names[0]]
    # resumed from step 2 while a later step 9 exists: the new step 4 stays, even with keep=1
    assert rotation_victims(names, 1, names[1]) == [names[0]]
