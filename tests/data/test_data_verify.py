"""Verification by annealing: the candidate share of annealing tokens, log-likelihood MC scoring, paired runs over
seeds that resume without redoing finished arms, and bad input failing with a MiniCPM4Error."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from train_util import TINY_MODEL, make_shards, paragraphs, small_tokenizer, tiny_config

from minicpm4.cli import _register_all, cli
from minicpm4.config import ModelConfig, preset
from minicpm4.data import mc_eval
from minicpm4.data.verification import MixLoader, VerifyJob, run_verify
from minicpm4.data.verify_report import summarize
from minicpm4.errors import CheckpointError, ConfigError, InputError, MiniCPM4Error
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.train.shard_writer import FORMAT
from minicpm4.train.token_loader import PackedLoader, TokenShards
from minicpm4.train.trainer import train

_register_all()


pytestmark = pytest.mark.usefixtures("one_thread")


def constant_shards(root, token, n):
    """A hand-written token index whose stream is n copies of `token` (so every row's source is visible)."""
    root.mkdir(parents=True)
    np.full(n, token, dtype=np.uint16).tofile(root / "00000.bin")
    index = {"format": FORMAT, "dtype": "uint16", "vocab_size": 16, "shards": [{"file": "00000.bin", "tokens": n}]}
    (root / "index.json").write_text(json.dumps(index))
    return TokenShards(root)


@pytest.mark.parametrize("ratio", [0.3, 0.55])
def test_candidate_share_of_annealing_tokens(tmp_path, ratio):
    default, cand = constant_shards(tmp_path / "d", 3, 2000), constant_shards(tmp_path / "c", 7, 500)
    b, steps, seq = 10, 7, 8
    loader = MixLoader(PackedLoader(default, seq, b, 0), PackedLoader(cand, seq, b, 1), ratio)
    per_step = []
    for _ in range(steps):
        batch = loader.next_batch()
        assert batch["input_ids"].shape == (b, seq) and set(batch["labels"].unique().tolist()) <= {3, 7}
        per_step.append(int((batch["labels"] == 7).sum()))
    assert sum(per_step) % seq == 0  # whole rows
    assert abs(sum(per_step) / seq - ratio * steps * b) <= 0.5 + 1e-9  # candidate rows: ratio of all, rounded
    assert all(abs(k / seq - ratio * b) < 1 for k in per_step)  # spread over the steps, not bunched
    baseline = MixLoader(PackedLoader(default, seq, b, 0), None, ratio)
    assert all(int((baseline.next_batch()["labels"] == 7).sum()) == 0 for _ in range(steps))


def tiny_model(vocab):
    cfg = preset("tiny").to_dict()
    cfg.update(TINY_MODEL, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return MiniCPM4ForCausalLM(ModelConfig.from_dict(cfg)).float()


def test_mc_scores_sum_logprob_and_the_preferred_option_wins(real_text):
    tok = small_tokenizer(real_text)
    model = tiny_model(tok.vocab_size).eval()
    item = {"question": "Permission is hereby granted, free of", "answer": 2,
            "options": ["the Python license", "any software foundation", "charge, to any person", "this agreement"]}
    q = tok.encode(item["question"], add_special_tokens=True)
    for option, score in zip(item["options"], mc_eval.option_logprobs(model, tok, item["question"], item["options"])):
        o = tok.encode(" " + option, add_special_tokens=False)
        with torch.no_grad():  # reference: one forward per prefix, log-prob of the next option token
            ref = sum(torch.log_softmax(model(torch.tensor([q + o[:j]]))[0, -1].float(), -1)[o[j]].item()
                      for j in range(len(o)))
        assert score == pytest.approx(ref, abs=1e-4)
    # make the model prefer option 2 by training on question + that option; the eval must then pick it
    ids = torch.tensor([q + tok.encode(" " + item["options"][2], add_special_tokens=False)])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0].float(), ids[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    result = mc_eval.score_items(model, tok, [item])
    assert result["mc_accuracy"] == 1.0 and result["mc_margin"] > 0
    wrong = dict(item, answer=0)
    assert mc_eval.score_items(model, tok, [wrong])["mc_accuracy"] == 0.0


def test_mc_items_are_equal_length_endings_from_other_documents():
    docs = [f"Document {d} starts here. " + " ".join(f"Sentence {d}.{s} talks about item {d}{s} and ends with "
                                                     f"word {d}-{s}." for s in range(4)) for d in range(6)]
    items = mc_eval.build_items(docs, 10, seed=1, options=4, ending=4)
    assert len(items) == 10
    for it in items:
        right = it["options"][it["answer"]]
        doc = next(d for d in docs if (it["question"] + " " + right) in " ".join(d.split()))
        assert all(len(o.split()) == 4 for o in it["options"]) and len(set(it["options"])) == 4
        assert all(o not in doc for i, o in enumerate(it["options"]) if i != it["answer"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_text):
    """A base checkpoint (tiny model, 6 steps), a default mix and a candidate corpus as JSONL."""
    tmp = tmp_path_factory.mktemp("verify")
    tok = small_tokenizer(real_text)
    base = train(tiny_config(make_shards(tmp, real_text, tok), tmp / "base", steps=6, warmup_steps=1,
                             decay_steps=2))["checkpoint"]
    paras = paragraphs(real_text)
    (tmp / "mix.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    salad = [" ".join(sorted(p.split())) for p in paras[:20]]  # the same words, in sorted order
    (tmp / "cand.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in salad))
    return tmp, base


def job(setup, out, **kw):
    tmp, base = setup
    args = dict(base=str(base), candidate=[str(tmp / "cand.jsonl")], default_mix=[str(tmp / "mix.jsonl")],
                out=str(out), seeds=2, steps=3, mc_items=8, eval_tokens=256, heldout=0.2, threads=1)
    args.update(kw)
    return VerifyJob(**args)


def test_verify_runs_paired_seeds_and_resumes(setup, tmp_path):
    out = tmp_path / "v"
    logs = []
    results = run_verify(job(setup, out), log=logs.append)
    runs = results["runs"]
    assert sorted(runs) == ["0", "1"] and all(sorted(r) == ["baseline", "candidate"] for r in runs.values())
    b = 4  # tiny_config's batch_size, copied from the base run
    for r in runs.values():
        assert r["candidate"]["rows"] == {"candidate": round(0.3 * b * 3), "default": 3 * b - round(0.3 * b * 3)}
        assert r["baseline"]["rows"] == {"candidate": 0, "default": 3 * b}
        assert r["candidate"]["heldout_loss"] != r["baseline"]["heldout_loss"]
        assert r["candidate"]["mc_items"] == len((out / "mc.jsonl").read_text().splitlines()) > 0
    d = [runs[s]["candidate"]["heldout_loss"] - runs[s]["baseline"]["heldout_loss"] for s in "01"]
    assert results["summary"]["heldout_loss"]["diff"] == pytest.approx(sum(d) / 2)
    assert results["summary"]["heldout_loss"]["se"] == pytest.approx(abs(d[0] - d[1]) / 2)
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    # held-out documents are not in the annealing split
    held = (out / "data" / "heldout.jsonl").read_text().splitlines()
    assert held and not set(held) & set((out / "data" / "train.jsonl").read_text().splitlines())
    trained = [m for m in logs if m.startswith("seed ")]
    assert len(trained) == 4

    logs.clear()
    again = run_verify(job(setup, out), log=logs.append)  # everything finished: nothing is rerun
    assert not [m for m in logs if m.startswith("seed ")] and again["runs"] == runs
    saved = json.loads((out / "results.json").read_text())
    del saved["runs"]["1"]["candidate"]  # as if interrupted during the last arm
    (out / "results.json").write_text(json.dumps(saved))
    logs.clear()
    more = run_verify(job(setup, out, seeds=3), log=logs.append)
    assert [m.split(":")[0] for m in logs if m.startswith("seed ")] == ["seed 1 candidate", "seed 2 baseline",
                                                                        "seed 2 candidate"]
    assert more["runs"]["0"] == runs["0"] and more["runs"]["1"]["baseline"] == runs["1"]["baseline"]
    assert more["runs"]["1"]["candidate"] == runs["1"]["candidate"]  # deterministic: fp32 on CPU, seeded order
    assert more["summary"]["heldout_loss"]["seeds"] == 3
    with pytest.raises(ConfigError, match="other settings \\(ratio\\)"):
        run_verify(job(setup, out, ratio=0.5))
    # another candidate against the same baselines: only its candidate arms run
    logs.clear()
    tmp, _ = setup
    other = run_verify(job(setup, tmp_path / "w", candidate=[str(tmp / "mix.jsonl")], ratio=0.5, baseline_from=str(out)),
                       log=logs.append)
    assert [m.split(":")[0] for m in logs if m.startswith("seed ")] == ["seed 0 candidate", "seed 1 candidate"]
    assert all(other["runs"][s]["baseline"] == runs[s]["baseline"] for s in "01")
    with pytest.raises(ConfigError, match="--baseline-from: .* other settings \\(steps\\)"):
        run_verify(job(setup, tmp_path / "x", steps=2, baseline_from=str(out)))


def test_bad_input_fails_clearly(setup, tmp_path):
    tmp, base = setup
    for ratio in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match="--candidate-ratio must be strictly between 0 and 1"):
            run_verify(job(setup, tmp_path / "a", ratio=ratio))
    with pytest.raises(InputError, match="nope.jsonl: no such file"):
        run_verify(job(setup, tmp_path / "b", candidate=[str(tmp / "nope.jsonl")]))
    with pytest.raises(InputError, match="gone: no such file"):
        run_verify(job(setup, tmp_path / "b", default_mix=[str(tmp / "gone")]))
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "Too short to fill a batch."}) + "\n")
    with pytest.raises(ConfigError, match="candidate/index.json: .* fewer than batch_size 4"):
        run_verify(job(setup, tmp_path / "s", candidate=[str(tmp_path / "short.jsonl")]))
    assert not (tmp_path / "s" / "results.json").exists()  # nothing was annealed
    with pytest.raises(CheckpointError, match="missing_ckpt"):
        run_verify(job(setup, tmp_path / "c", base=str(tmp / "missing_ckpt")))
    r = CliRunner().invoke(cli, ["data", "verify", "--base", str(base), "--candidate", str(tmp / "cand.jsonl"),
                                 "--default-mix", str(tmp / "mix.jsonl"), "--candidate-ratio", "2", "-o",
                                 str(tmp_path / "d")])
    assert isinstance(r.exception, MiniCPM4Error) and "--candidate-ratio" in str(r.exception)


def test_summary_interval_uses_student_t():
    runs = {str(i): {"baseline": {"heldout_loss": 1.0, "mc_accuracy": 0.5, "mc_margin": 0.0},
                     "candidate": {"heldout_loss": 1.0 + d, "mc_accuracy": 0.5, "mc_margin": 0.0}}
            for i, d in enumerate([-0.1, -0.3, -0.2])}
    s = summarize(runs)["heldout_loss"]  # sd 0.1 over 3 seeds: t(2) = 4.303, the interval crosses 0
    assert s["diff"] == pytest.approx(-0.2) and s["se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert s["ci95"] == pytest.approx([-0.2 - 4.303 * 0.1 / 3 ** 0.5, -0.2 + 4.303 * 0.1 / 3 ** 0.5])
    assert s["significant"] is False
    for i, d in enumerate([-0.18, -0.22, -0.2]):
        runs[str(i)]["candidate"]["heldout_loss"] = 1.0 + d
    s = summarize(runs)["heldout_loss"]  # sd 0.02: [-0.25, -0.15]
    assert s["ci95"] == pytest.approx([-0.2 - 4.303 * 0.02 / 3 ** 0.5, -0.2 + 4.303 * 0.02 / 3 ** 0.5])
    assert s["significant"] is True and summarize(runs)["mc_accuracy"]["significant"] is False


def test_annealing_is_the_base_runs_decay_phase(setup, tmp_path):
    from minicpm4.data.verification import anneal_config, load_base
    from minicpm4.train.trainer import lr_factor
    _, base = setup
    _, _, state, _ = load_base(str(base))
    cfg = anneal_config(job(setup, tmp_path, steps=0), state, tmp_path, seed=5)
    assert (cfg.steps, cfg.warmup_steps, cfg.decay_steps) == (2, 0, 2)  # the base run's decay_steps=2
    assert (cfg.lr, cfg.batch_size, cfg.seq_len, cfg.seed) == (state["config"]["lr"], 4, 32, 5)
    factors = [lr_factor(cfg, s) for s in range(cfg.steps)]  # exponential: peak * r^(s+1)/steps
    assert factors == pytest.approx([cfg.min_lr_ratio ** 0.5, cfg.min_lr_ratio])
    with pytest.raises(ConfigError, match="give --steps"):
        anneal_config(job(setup, tmp_path, steps=0), {"config": {**state["config"], "decay_steps": 0}}, tmp_path, 0)
