"""EAGLE draft training (the draft objective in the one training loop, its checkpoints and resume, `train draft`'s
config) and draft files (our layout and the official names)."""

import json

import pytest
import torch
from model_util import random_model

from minicpm4.config import tiny
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.spec.draft_training import evaluate_draft, self_distill, train_draft
from minicpm4.spec.eagle import EagleDraft, is_draft_dir, load_draft
from minicpm4.train.train_config import TrainConfig
from minicpm4.weights import save_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return random_model(tiny(), seed=0)


@pytest.fixture(scope="module")
def tokens(target):
    """Text the target itself writes (greedy from random starts): what a draft has to predict."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (4,), generator=g).tolist() for _ in range(8)]
    gens = Engine(target).generate(prompts, SamplingParams(max_new_tokens=60, ignore_eos=True))
    return [t for p, gen in zip(prompts, gens) for t in p + gen.token_ids]


ARGS = dict(seq_len=32, batch_size=4, lr=3e-3, save_every=10)


def config(out, steps, draft=None, **kw):
    return TrainConfig.for_task("draft", out_dir=str(out), steps=steps, **{**ARGS, **kw},
                                draft={"max_windows": 16, **(draft or {})})


def draft_dir(target, tokens, cfg, log=lambda m: None):
    return train_draft(cfg, target, tokens, log=log)["output"]


def test_training_teaches_the_draft_the_target_next_tokens(target, tokens, tmp_path):
    before = evaluate_draft(EagleDraft.for_target(target), target, tokens, 32, 16)
    out = draft_dir(target, tokens, config(tmp_path / "d", 60))
    draft = load_draft(out, target)
    after = evaluate_draft(draft, target, tokens, 32, 16)
    assert after["top1"] > before["top1"] + 0.3, (before, after)
    assert after["reg"] < before["reg"]
    assert is_draft_dir(out) and (out / "checkpoints" / "latest").read_text().strip() == "step_0000060"


def test_draft_task_defaults_are_warmup_then_cosine_to_a_tenth():
    from minicpm4.train.trainer import lr_factor
    cfg = TrainConfig.for_task("draft", steps=50)
    assert (cfg.lr, cfg.warmup_steps, cfg.decay_steps, cfg.decay_shape, cfg.batch_size, cfg.dtype) == \
        (1e-3, 10, 40, "cosine", 4, "fp32")
    f = [lr_factor(cfg, s) for s in range(50)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[49] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f[9:], f[10:]))
    assert TrainConfig.for_task("draft", steps=4).warmup_steps == 4  # as `train draft` always did: min(10, steps)


def test_training_from_init_starts_at_the_given_draft(target, tokens, tmp_path):
    trained = draft_dir(target, tokens, config(tmp_path / "d", 30))
    tuned = draft_dir(target, tokens, config(tmp_path / "t", 1, lr=1e-9, draft={"init": str(trained)}))
    fresh = draft_dir(target, tokens, config(tmp_path / "f", 1, lr=1e-9))
    a, b, c = (load_draft(p, target).state_dict() for p in (trained, tuned, fresh))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-4) for k in a)


def test_self_distill_continues_prompts_with_the_target_greedy_output(target, tokens):
    seqs = self_distill(target, tokens, prompt_len=6, new_tokens=8, count=3, batch=2, log=lambda m: None)
    assert len(seqs) == 3
    starts = [(len(tokens) - 6) * i // 3 for i in range(3)]
    for s, seq in zip(starts, seqs):
        prompt = tokens[s:s + 6]
        alone = Engine(target).generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
        assert seq == prompt + alone


def test_interrupted_training_resumes_to_the_same_weights(target, tokens, tmp_path):
    straight = draft_dir(target, tokens, config(tmp_path / "a", 30))

    def interrupt(msg):
        if msg.startswith("step 20/"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_draft(config(tmp_path / "b", 30), target, tokens, log=interrupt)
    logs = []
    resumed = draft_dir(target, tokens, config(tmp_path / "b", 30), log=logs.append)
    assert any("resumed" in m and "step 10" in m for m in logs)  # the last checkpoint before the interrupt
    a, b = load_draft(straight, target).state_dict(), load_draft(resumed, target).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_official_layout_loads(target, tmp_path):
    """A draft written with the names of the official MiniCPM EAGLE checkpoints (fc, input_norm1/2, eagle_layers,
    plus embed_tokens / lm_head / norm that the draft takes from the target) loads and computes the same."""
    ours = EagleDraft.for_target(target, seed=3)
    cfg = {**ours.config.to_dict(), "mup_denominator": ours.mup_denominator}
    cfg["architectures"] = ["EagleMiniCPMForCausalLM"]
    state = {**ours.state_dict(), "model.embed_tokens.weight": target.model.embed_tokens.weight,
             "lm_head.weight": target.lm_head.weight, "model.norm.weight": torch.ones(128)}
    save_state_dict(state, tmp_path, tied=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert is_draft_dir(tmp_path)
    loaded = load_draft(tmp_path, target)
    x, f, p = torch.tensor([[4, 9]]), torch.randn(1, 2, 128), torch.arange(2)[None]
    torch.testing.assert_close(loaded(x, f, p)[0], ours(x, f, p)[0])


def test_draft_layer_uses_the_target_depth_for_residual_scaling(target):
    d = EagleDraft.for_target(target)
    layer = d.model.eagle_layers[0]
    assert layer.residual_scale == pytest.approx(target.config.scale_depth / target.config.num_hidden_layers ** 0.5)


def test_cli_train_draft_takes_the_train_config_and_resumes(tmp_path, real_text):
    """`train draft` reads --config/--set like pretrain, its old flags are aliases of config keys, --stop-after
    checkpoints, and the same command again resumes and writes the draft."""
    import subprocess
    import sys

    from train_util import small_tokenizer

    from minicpm4.io.loader import save_pretrained
    tok = small_tokenizer(real_text)  # a small vocabulary keeps the two runs cheap
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    save_pretrained(random_model(cfg, seed=0), tok, tmp_path / "target")
    (tmp_path / "text.txt").write_text(real_text[:20000])
    (tmp_path / "draft.json").write_text(json.dumps({"model": str(tmp_path / "target"), "steps": 4, "seq_len": 32,
                                                     "batch_size": 2, "draft": {"target_dtype": "fp32"}}))
    cmd = [sys.executable, "-m", "minicpm4.cli", "train", "draft", "--config", str(tmp_path / "draft.json"),
           "--set", "draft.max_windows=4", "--data", str(tmp_path / "text.txt"), "-o", str(tmp_path / "d"),
           "--save-every", "1"]
    r = subprocess.run(cmd + ["--stop-after", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 2 and not is_draft_dir(tmp_path / "d")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed at step 2" in r.stderr and "4 windows of 32 tokens" in r.stderr
    assert r.stdout.strip() == str(tmp_path / "d") and is_draft_dir(tmp_path / "d")
    import minicpm4
    target, _ = minicpm4.load(tmp_path / "target", dtype="fp32")
    load_draft(tmp_path / "d", target)
