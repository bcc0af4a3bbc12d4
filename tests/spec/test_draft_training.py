"""EAGLE draft training (objective, checkpoints, resume) and draft files (our layout and the official names)."""

import json

import pytest
import torch
from model_util import random_model

from minicpm4.config import tiny
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.spec.draft_training import DraftTrainArgs, evaluate_draft, self_distill, train_draft
from minicpm4.spec.eagle import EagleDraft, is_draft_dir, load_draft
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


ARGS = dict(seq_len=32, batch_size=4, lr=3e-3, max_windows=16, save_every=10)


def test_training_teaches_the_draft_the_target_next_tokens(target, tokens, tmp_path):
    before = evaluate_draft(EagleDraft.for_target(target), target, tokens, 32, 16)
    out = train_draft(target, tokens, tmp_path / "d", DraftTrainArgs(steps=60, **ARGS), log=lambda m: None)
    draft = load_draft(out, target)
    after = evaluate_draft(draft, target, tokens, 32, 16)
    assert after["top1"] > before["top1"] + 0.3, (before, after)
    assert after["reg"] < before["reg"]
    assert is_draft_dir(out) and (out / "checkpoint.pt").is_file()


def test_training_from_init_starts_at_the_given_draft(target, tokens, tmp_path):
    trained = train_draft(target, tokens, tmp_path / "d", DraftTrainArgs(steps=30, **ARGS), log=lambda m: None)
    args = DraftTrainArgs(steps=1, **{**ARGS, "lr": 1e-9})
    tuned = train_draft(target, tokens, tmp_path / "t", args, log=lambda m: None, init=trained)
    fresh = train_draft(target, tokens, tmp_path / "f", args, log=lambda m: None)
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
    args = DraftTrainArgs(steps=30, **ARGS)
    straight = train_draft(target, tokens, tmp_path / "a", args, log=lambda m: None)

    def interrupt(msg):
        if msg.startswith("step 20/"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_draft(target, tokens, tmp_path / "b", args, log=interrupt)
    logs = []
    resumed = train_draft(target, tokens, tmp_path / "b", args, log=logs.append)
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
