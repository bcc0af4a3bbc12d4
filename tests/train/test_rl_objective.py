"""The RL objective in the one training loop, on a tiny random model and a tiny tokenizer: steps run and change the
weights, metrics are finite, the loss keeps the loop's global-mean convention (the same step whatever the
micro-batch split), an interrupted run resumed equals an uninterrupted one (rollout buffer, carried groups and
reference model included), config errors name their field, and `minicpm4 train rl` runs and resumes."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_util import random_model
from train_util import TINY_MODEL, small_tokenizer

from minicpm4.config import ModelConfig, tiny
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.train.checkpoint import load_checkpoint, write_model_dir
from minicpm4.train.rl.chain_tasks import chain_tasks
from minicpm4.train.rl.objective import RL
from minicpm4.train.rl.reward import Reward
from minicpm4.train.train_config import TrainConfig
from minicpm4.train.trainer import split, train

pytestmark = pytest.mark.usefixtures("one_thread")

# A random model writes random tokens: the garble filter would drop them all (stray UTF-8 bytes) and most run to
# max_len, so both filters are off here (their rules have their own tests in test_rl_loss.py / test_rl_rollout.py).
RL_SECTION = {"group_size": 2, "chunk_tokens": 4, "max_len": 12, "max_active": 8, "task_max_steps": 2,
              "chat_template": False, "overlong_filter": False, "garble_filter": False, "kl_coef": 0.05,
              "ref_refresh": 3}


def e_share(text: str, task) -> Reward:
    """A reward a random model's outputs vary under (the math reward is 0 for all of them): the share of 'e's."""
    return Reward(text.count("e") / max(len(text), 1), "e share")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    text = "\n".join(t.prompt + "\n" + t.worked for t in chain_tasks(150, seed=5, max_steps=4))
    tok = small_tokenizer(text, 300)
    # 31 of ~300 ids stop a sample (about 1 token in 10 were the random model's choices uniform), so response
    # lengths vary, groups finish in different rounds and steps end with unfinished samples in the rollout buffer
    # (what resume must keep)
    stops = [tok.eos_token_id] + list(range(100, 130))
    mc = ModelConfig.from_dict({**tiny().to_dict(), **TINY_MODEL, "vocab_size": tok.vocab_size,
                                "eos_token_id": stops, "bos_token_id": tok.bos_token_id})
    d = tmp_path_factory.mktemp("rl") / "policy"
    write_model_dir(d, mc, random_model(mc).state_dict(), tok)
    return d


def rl_config(model_dir, out, **kw) -> TrainConfig:
    rl = {**RL_SECTION, **kw.pop("rl", {})}
    return TrainConfig.for_task("rl", **{"model": str(model_dir), "out_dir": str(out), "steps": 4, "batch_size": 4,
                                         "micro_batch_size": 2, "lr": 3e-3, "threads": 1, "rl": rl, **kw})


def run(cfg, **kw):
    obj = RL.from_config(cfg)
    obj.reward = e_share
    return obj, train(cfg, objective=obj, **kw)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rl_steps_change_the_weights_with_finite_metrics(model_dir, tmp_path):
    cfg = rl_config(model_dir, tmp_path / "run", steps=3, eval_every=3, rl={"eval_prompts": 3})
    obj = RL.from_config(cfg)
    obj.reward = e_share
    before = {k: v.clone() for k, v in obj.model.state_dict().items()}
    result = train(cfg, objective=obj)
    assert result["step"] == 3
    moved = [k for k, v in obj.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) == len(before)  # every tensor trained
    held_out = records(tmp_path / "run")
    assert [r["step"] for r in held_out if "eval_reward" in r] == [0, 3]  # greedy, on held-out prompts
    assert all(0 <= r["eval_reward"] <= 1 for r in held_out if "eval_reward" in r)
    recs = [r for r in held_out if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        for k in ("loss", "pg_loss", "kl", "ratio_mean", "reward", "grad_norm", "rollout_s", "idle_share"):
            assert math.isfinite(r[k]), (k, r)
        assert r["grad_norm"] > 0 and 0 <= r["reward"] <= 1 and r["groups_dropped"] >= 0
        assert 0 <= r.get("reward_rollout", 0) <= 1
    assert recs[0]["kl"] == 0.0 and recs[1]["kl"] > 0  # the reference is the start policy, then the policy moves
    assert any(r["version_lag"] > 0 for r in recs)  # samples begun under an older policy finished later


@pytest.mark.parametrize("token_level", [True, False])
def test_loss_is_the_global_mean_whatever_the_split(model_dir, tmp_path, token_level):
    """The gradient of one step's batch is the same whether it runs as one micro-batch, as 4 micro-batches, or as
    2 simulated DDP processes of 2 micro-batches each (each process's gradient summed, then averaged over the 2 as
    DDP does): the loop's convention that the objective is the mean over the global batch."""
    cfg = rl_config(model_dir, tmp_path / "g", rl={"token_level": token_level})
    obj = RL.from_config(cfg)
    obj.reward = e_share
    batch = obj.next_batch(0)
    assert len(set(batch["mask"].sum(1).tolist())) > 1  # samples of different lengths: a wrong weighting shows

    def grads(parts: list[list[dict]]) -> list[torch.Tensor]:
        """parts[p]: process p's micro-batches; counts summed over processes as the loop does."""
        obj.model.zero_grad(set_to_none=True)
        counts = sum(obj.counts({k: torch.cat([mb[k] for mb in mbs]) for k in batch}) for mbs in parts)
        for mbs in parts:
            for mb in mbs:
                loss, _ = obj.loss(obj.model, mb, counts, len(parts))
                loss.backward()
        return [p.grad.clone() / len(parts) for p in obj.model.parameters()]  # DDP: the average over processes

    whole = grads([[batch]])
    assert sum(g.abs().sum() for g in whole) > 0
    for parts in ([split(batch, 4)], [split(h, 2) for h in split(batch, 2)]):
        for a, b in zip(grads(parts), whole, strict=True):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


def test_interrupted_run_resumes_exactly(model_dir, tmp_path):
    """Stopped after step 3, resumed to 5: the same weights, reference and curve as one run. The reference is
    refreshed at step 2 (so the resumed run must take it from the checkpoint, not from the start model) and 4.
    12 slots for batches of 4 samples: steps end with samples in flight, finished samples of incomplete groups and
    informative groups carried to the next step, all of which the checkpoint must hold (a carry needs two groups
    completing in the engine step that completes the batch: seed 3 has one before step 3)."""
    section = {"ref_refresh": 2, "max_active": 12}
    full, _ = run(rl_config(model_dir, tmp_path / "full", steps=5, seed=3, rl=section))
    cfg = rl_config(model_dir, tmp_path / "cut", steps=5, seed=3, rl=section)
    _, first = run(cfg, stop_after=3)
    assert first["interrupted"] is False and first["step"] == 3
    _, _, _, state = load_checkpoint(first["checkpoint"])
    data = state["data"]["ranks"][0]
    assert data["buffer"] and data["finished"] and data["carry"], "the test's point: rollout state in flight"
    assert state["data"]["reference_refreshed_at"] == 2
    resumed, second = run(cfg, resume=str(tmp_path / "cut"))
    assert second["step"] == 5
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in full.reference.model.state_dict().items():
        assert torch.equal(v, resumed.reference.model.state_dict()[k]), k
    a, b = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [(r["loss"], r["kl"], r["reward"]) for r in a] == [(r["loss"], r["kl"], r["reward"]) for r in b]
    other = rl_config(model_dir, tmp_path / "cut", steps=5, rl={**section, "group_size": 4})
    with pytest.raises(CheckpointError, match=r"rl\.group_size \(2 -> 4\)"):  # the prompts in flight hold 2 each
        run(other, resume=str(tmp_path / "cut"))


@pytest.mark.parametrize("settings, field", [
    ({"rl": {"group_size": 1}}, "rl.group_size"),
    ({"rl": {"chunk_tokens": 0}}, "rl.chunk_tokens"),
    ({"rl": {"task": "poems"}}, "rl.task"),
    ({"rl": {"reward": "vibes"}}, "rl.reward"),
    ({"rl": {"dual_clip_c": 0.5}}, "rl.dual_clip_c"),
    ({"rl": {"kl_coef": -1}}, "rl.kl_coef"),
    ({"rl": {"group_sise": 4}}, "rl.group_sise"),
    ({"batch_size": 6, "micro_batch_size": 2, "rl": {"group_size": 4}}, "batch_size"),
    ({"parallel": "fsdp"}, "parallel"),
    ({"rl": {"rollout_urls": ["localhost:8000"]}}, "rl.rollout_urls"),
])
def test_config_errors_name_the_field(settings, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TrainConfig.for_task("rl", **settings)


def test_model_errors_name_the_field(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="model: rl trains a loadable model"):
        RL.from_config(TrainConfig.for_task("rl", model="tiny"))
    with pytest.raises(ConfigError, match=r"rl\.max_len \(4096\)"):
        RL.from_config(rl_config(model_dir, tmp_path / "x", rl={"max_len": 4096}))
    with pytest.raises(ConfigError, match=r"rl\.max_active \(1\)"):
        RL.from_config(rl_config(model_dir, tmp_path / "x", rl={"max_active": 1}))


def test_cli_train_rl_runs_and_resumes(model_dir, tmp_path):
    """The math reward (the CLI's) is 0 for every random response, so dynamic sampling drops every group and,
    after rl.max_draws draws, tops the batch up: the run goes on (zero advantage), and says so in `topped_up`."""
    out = tmp_path / "cli"
    conf = tmp_path / "rl.toml"
    conf.write_text(f'model = "{model_dir}"\nout_dir = "{out}"\nsteps = 2\nbatch_size = 4\nmicro_batch_size = 2\n'
                    'threads = 1\n[rl]\ngroup_size = 2\nchunk_tokens = 4\nmax_len = 8\nmax_draws = 1\n'
                    'task_max_steps = 1\nchat_template = false\noverlong_filter = false\ngarble_filter = false\n')
    cmd = [sys.executable, "-m", "minicpm4.cli", "train", "rl", "--config", str(conf), "--set", "rl.kl_coef=0.01"]
    r = subprocess.run(cmd + ["--stop-after", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 1
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed at step 1" in r.stderr and json.loads(r.stdout.strip().splitlines()[-1])["step"] == 2
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["topped_up"] == 2 and r["reward"] == 0 for r in recs)
    _, _, _, state = load_checkpoint(out)
    assert state["config"]["rl"]["kl_coef"] == 0.01 and "reference" in state["data"]


def test_task_source_is_seekable_with_a_disjoint_held_out_stream(model_dir):
    from minicpm4.text.tokenizer import Tokenizer
    from minicpm4.train.rl.task_source import REWARDS, TaskSource
    src = TaskSource(Tokenizer.from_dir(model_dir), seed=3, max_steps=4, chat_template=False)
    assert src.task(7) == TaskSource(src.tokenizer, seed=3, max_steps=4).task(7)  # a pure function of (seed, i)
    assert src.task(7) != src.task(8) and src.task(7) != TaskSource(src.tokenizer, seed=4, max_steps=4).task(7)
    train_qs = {src.task(i).question for i in range(50)}
    assert not train_qs & {src.task(("held-out", i)).question for i in range(50)}
    task = src.task(7)
    assert REWARDS["math"](task.worked, task).value == 1.0
    assert REWARDS["math"](task.worked.replace(f"\\boxed{{{task.answer}}}", f"\\boxed{{{task.answer + 1}}}"),
                           task).value == 0.0
    ids = src.prompt_ids(7)
    assert ids[0] == src.tokenizer.bos_token_id and src.tokenizer.decode(ids[1:]) == task.prompt


def test_two_processes_train_in_sync_resume_exactly_and_equal_one(model_dir, tmp_path):
    """Under torchrun (DDP, gloo): each process rolls out its own prompts, the weights stay equal across the two,
    and a run stopped at step 2 and resumed (each process's rollout buffer from the checkpoint) ends on the same
    weights as the uninterrupted run. Two processes equal one: with vanilla rollout and no dynamic sampling a step
    trains on the next batch_size / group_size prompts whichever process rolls each out, and a sample's seed is
    its prompt's (not its process's), so the two processes follow one process's loss curve to the same weights."""
    cfg = rl_config(model_dir, tmp_path, rl={"ref_refresh": 2, "max_active": 6})
    same = {"dynamic_sampling": False, "chunk_tokens": RL_SECTION["max_len"], "max_active": 0}  # slots: the batch
    one, two = (rl_config(model_dir, tmp_path / name, rl=same) for name in ("one", "two"))
    worker = Path(__file__).with_name("rl_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           json.dumps(cfg.to_dict()), json.dumps(two.to_dict())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parent.parent), *sys.path])})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["full"] == ranks[1]["full"]  # DDP: one model
    assert all(x["cut"] == x["full"] for x in ranks)  # exact resume
    assert all(x["cut_buffer_2"] > 0 for x in ranks)  # both processes had samples in flight at the stop
    a, b = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [x["loss"] for x in a] == [x["loss"] for x in b] and len(a) == 4
    run(one)  # one process: 2 micro-batches of 2 samples per step; two: one each
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(b) == 4 and [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], abs=1e-6)
    assert [x["kl"] for x in b] == pytest.approx([x["kl"] for x in a], abs=1e-6)
    assert a[0]["loss"] != a[-1]["loss"]  # the runs really trained
    _, _, w1, _ = load_checkpoint(tmp_path / "one")
    _, _, w2, _ = load_checkpoint(tmp_path / "two")
    for k, v in w1.items():  # Adam moves each weight ~lr = 3e-3 a step: 1e-5 is reduction-order noise, not a sample
        torch.testing.assert_close(w2[k], v, atol=1e-5, rtol=0, msg=k)


def test_rollout_on_a_server_trains_as_in_process(model_dir, tmp_path, monkeypatch):
    """rl.rollout_urls: every step writes the policy, the server reloads it as version `step`, and the rounds run
    there; with the same seeds the run equals the in-process one (curve and weights), and the versions the server
    reports tag the chunks as the in-process steps do (version_lag: samples resumed across steps)."""
    from server_util import running_server

    import minicpm4
    from minicpm4.serve.llm import LLM
    local, _ = run(rl_config(model_dir, tmp_path / "local", steps=3, rl={"stream": False}))  # rounds, as a server
    monkeypatch.setenv("MINICPM4_ADMIN_KEY", "adm")
    with running_server(LLM(*minicpm4.load(model_dir, dtype="fp32"), max_slots=8), admin_key="adm") as (url, srv):
        remote, result = run(rl_config(model_dir, tmp_path / "remote", steps=3, rl={"rollout_urls": [url]}))
        assert srv.weights.version == 2  # reloaded before each step's rollout: versions 0, 1, 2
    assert result["step"] == 3
    a, b = records(tmp_path / "local"), records(tmp_path / "remote")
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "kl", "reward", "response_len", "buffered", "version_lag"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), (k, ra, rb)
        assert "idle_share" in ra and "idle_share" not in rb  # a server's decode slots are not observable
    assert max(r["version_lag"] for r in a) > 0  # some trained tokens were sampled by an earlier step's weights
    for k, v in local.model.state_dict().items():
        torch.testing.assert_close(remote.model.state_dict()[k], v, atol=1e-5, rtol=0)
    assert sorted(p.name for p in (tmp_path / "remote" / "rollout_weights" / "rank0").iterdir()) == ["v0000002"]


def test_training_prompts_skip_held_out_questions(model_dir, tmp_path):
    # one-operation chain_small questions come from ~17k combinations: 2000 training tasks meet some of the 64
    # held-out questions, which training skips so the held-out curve stays on unseen questions
    obj = RL.from_config(rl_config(model_dir, tmp_path / "x", rl={"task": "chain_small", "task_max_steps": 1,
                                                                  "eval_prompts": 64}))
    keys = [k for k, _ in itertools.islice(obj._prompts(), 2000)]
    questions = {obj.source.task(k).question for k in keys}
    assert len(obj.held_out) > 50 and not questions & obj.held_out and keys[-1] > 2000 - 1
