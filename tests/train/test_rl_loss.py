"""The RL loss terms on literal tensors: every expected value is derived by hand in the comment above it."""

import math
from types import SimpleNamespace

import pytest
import torch

from minicpm4.train.rl.advantages import group_advantages
from minicpm4.train.rl.dynamic_sampling import fill_batch, informative
from minicpm4.train.rl.garble import GarbleRules, garble_check, repeated_ngram_share
from minicpm4.train.rl.loss import LossSettings, policy_loss

PLAIN = LossSettings(dual_clip_c=None, kl_coef=0.0)  # only the clipped surrogate, token-level


def run(logp, old, adv, mask=None, settings=PLAIN, **kw):
    logp = torch.tensor(logp, dtype=torch.float32, requires_grad=True)
    old = torch.tensor(old, dtype=torch.float32)
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else torch.tensor(mask)
    loss, metrics = policy_loss(logp, old, torch.tensor(adv, dtype=torch.float32), mask, settings, **kw)
    loss.backward()
    return float(loss.detach()), logp.grad, metrics


def ratios(*r):  # log-probs whose ratio against old = 0 is r
    return [[math.log(x) for x in r]]


# ---- GRPO advantages ----

def test_group_advantages_normalised_by_unbiased_std():
    rewards = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 3]])
    # group 0: mean 0.5, deviations +-0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
    # group 1: all equal -> 0 (eps keeps it finite)
    # group 2: mean 0.75, deviations -0.75 x3, +2.25; sum of squares 6.75, / 3 = 2.25, std 1.5 -> -0.5 x3, 1.5
    want = torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025], [0, 0, 0, 0], [-0.5, -0.5, -0.5, 1.5]])
    torch.testing.assert_close(group_advantages(rewards), want, atol=1e-5, rtol=0)


def test_group_advantages_without_std():
    # Dr. GRPO: reward minus the group mean only; group 2 as above: -0.75 x3, 2.25
    got = group_advantages(torch.tensor([[0.0, 0, 0, 3]]), std_normalize=False)
    torch.testing.assert_close(got, torch.tensor([[-0.75, -0.75, -0.75, 2.25]]))


def test_group_advantages_reject_a_group_of_one():
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([[1.0], [0.0]]))


# ---- clip-higher ----

@pytest.mark.parametrize("eps_high, want_loss, want_grad, want_clip_high", [
    # A = +1, r = 0.5, 1, 1.25, 1.5; surrogate min(r, clip(r, 0.8, 1 + eps_high)):
    #   eps_high 0.28: 0.5, 1, 1.25, 1.28 -> loss -(4.03)/4; d(-r)/dlogp = -r on unclipped tokens, / 4 tokens
    (0.28, -4.03 / 4, [-0.125, -0.25, -0.3125, 0.0], 0.25),
    #   eps_high 0.2 (symmetric): 0.5, 1, 1.2, 1.2 -> loss -3.9/4; the 1.25 token is now clipped too
    (0.2, -3.9 / 4, [-0.125, -0.25, 0.0, 0.0], 0.5),
])
def test_clip_higher(eps_high, want_loss, want_grad, want_clip_high):
    s = LossSettings(eps_low=0.2, eps_high=eps_high, dual_clip_c=None, kl_coef=0.0)
    loss, grad, m = run(ratios(0.5, 1.0, 1.25, 1.5), [[0.0] * 4], [1.0], settings=s)
    assert loss == pytest.approx(want_loss, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([want_grad]), atol=1e-6, rtol=0)
    assert m["clip_high"] == want_clip_high and m["clip_low"] == 0


# ---- dual-clip ----

@pytest.mark.parametrize("c, want_loss, want_grad, want_dual", [
    # A = -1, r = 0.5, 1, 2, 4: min(-r, -clip(r, 0.8, 1.28)) = -max(r, clip(r)) = -0.8, -1, -2, -4
    # loss = (0.8 + 1 + 2 + 4)/4 = 1.95; grad r/4 except the 0.5 token (clipped at 0.8): 0, .25, .5, 1
    (None, 1.95, [0.0, 0.25, 0.5, 1.0], 0.0),
    # dual-clip c = 3: the r = 4 token's -4 becomes max(-4, -3) = -3, a constant: loss 6.8/4 = 1.7, grad 0 there
    (3.0, 1.7, [0.0, 0.25, 0.5, 0.0], 0.25),
])
def test_dual_clip_caps_negative_advantages(c, want_loss, want_grad, want_dual):
    s = LossSettings(dual_clip_c=c, kl_coef=0.0)
    loss, grad, m = run(ratios(0.5, 1.0, 2.0, 4.0), [[0.0] * 4], [-1.0], settings=s)
    assert loss == pytest.approx(want_loss, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([want_grad]), atol=1e-6, rtol=0)
    assert m["dual_clip"] == want_dual
    assert m["clip_low"] == 0.25  # the r = 0.5 token


def test_dual_clip_leaves_positive_advantages_alone():
    # A = +1, r = 4: the paper's max(., c*A) taken literally would give 3; we apply it to A < 0 only -> 1.28
    loss, _, m = run(ratios(4.0), [[0.0]], [1.0], settings=LossSettings(dual_clip_c=3.0, kl_coef=0.0))
    assert loss == pytest.approx(-1.28) and m["dual_clip"] == 0


# ---- token-level vs sample-level averaging ----

@pytest.mark.parametrize("token_level, want", [
    # r = 1 everywhere, so each token's loss is -A. Sample 0: 1 token, A = +2 -> -2. Sample 1: 3 tokens, A = -1 -> +1.
    (True, (-2 + 3) / 4),  # DAPO: over all 4 tokens
    (False, (-2 + 1) / 2),  # per-sample means -2 and +1, then their mean
])
def test_token_vs_sample_level(token_level, want):
    # sample 0's padding holds log-prob 100: if it leaked into exp() the loss would be inf
    logp, old = [[0.0, 100.0, 100.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    mask = [[True, False, False], [True, True, True]]
    s = LossSettings(token_level=token_level, dual_clip_c=None, kl_coef=0.0)
    loss, grad, m = run(logp, old, [2.0, -1.0], mask=mask, settings=s)
    assert loss == pytest.approx(want)
    assert m["tokens"] == 4 and grad[0, 1:].abs().sum() == 0


# ---- KL (k3) ----

def test_kl_k3_estimator():
    # logp = 0 (p = 1) and ref = log 0.5 on token 0, ref = 0 on token 1; A = 0 so only the KL term is left.
    # k3 = exp(ref - logp) - (ref - logp) - 1: token 0 -> 0.5 + ln 2 - 1 = 0.193147, token 1 -> 0
    # loss = coef * 0.193147 / 2; d k3 / d logp = 1 - exp(ref - logp) = 0.5 and 0, / 2 tokens
    ref = torch.tensor([[math.log(0.5), 0.0]])
    for coef in (1.0, 0.001):
        s = LossSettings(kl_coef=coef, dual_clip_c=None)
        loss, grad, m = run([[0.0, 0.0]], [[0.0, 0.0]], [0.0], settings=s, ref_logp=ref)
        assert loss == pytest.approx(coef * 0.0965736, rel=1e-5)
        torch.testing.assert_close(grad, torch.tensor([[coef * 0.25, 0.0]]))
        assert m["kl"] == pytest.approx(0.0965736, rel=1e-5)


def test_kl_needs_reference_logprobs():
    with pytest.raises(ValueError, match="ref_logp"):
        run([[0.0]], [[0.0]], [1.0], settings=LossSettings())


# ---- per-chunk importance weights ----

def test_chunk_importance_uses_each_chunks_behaviour_logprobs():
    # one sample, two chunks of two tokens: chunk 1 sampled by a policy that gave its tokens log-prob -1, chunk 2
    # by a later policy that gave -2. Current log-probs: -1, -1, -1.5, -1.5. A = +1, eps_high 0.28.
    logp, behaviour = [[-1.0, -1.0, -1.5, -1.5]], [[-1.0, -1.0, -2.0, -2.0]]
    prox = torch.tensor([[-1.2] * 4])  # the current weights' log-probs before this step's update
    # per chunk: r = 1, 1, e^0.5 = 1.65 (clipped to 1.28 twice) -> loss -(1 + 1 + 1.28 + 1.28)/4 = -1.14
    loss, grad, _ = run(logp, behaviour, [1.0], settings=PLAIN, prox_logp=prox)
    assert loss == pytest.approx(-1.14)
    # against prox: r = e^0.2 = 1.2214 (kept) twice, e^-0.3 = 0.7408 (A > 0, so min(r, 0.8) = r) twice
    s = LossSettings(chunk_importance=False, dual_clip_c=None, kl_coef=0.0)
    loss2, _, _ = run(logp, behaviour, [1.0], settings=s, prox_logp=prox)
    assert loss2 == pytest.approx(-(2 * math.exp(0.2) + 2 * math.exp(-0.3)) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="prox_logp"):
        run(logp, behaviour, [1.0], settings=s)


# ---- overlong and garble filters ----

@pytest.mark.parametrize("overlong, garble, want, kept", [
    # three one-token samples, r = 1, A = 1, 2, 4: token loss -A. Sample 1 truncated, sample 2 garbled.
    (True, True, -1.0, 1),
    (False, True, -(1 + 2) / 2, 2),
    (True, False, -(1 + 4) / 2, 2),
    (False, False, -(1 + 2 + 4) / 3, 3),
])
def test_overlong_and_garble_filters(overlong, garble, want, kept):
    s = LossSettings(overlong_filter=overlong, garble_filter=garble, dual_clip_c=None, kl_coef=0.0)
    loss, grad, m = run([[0.0], [0.0], [0.0]], [[0.0], [0.0], [0.0]], [1.0, 2.0, 4.0], settings=s,
                        truncated=torch.tensor([False, True, False]), garbled=torch.tensor([False, False, True]))
    assert loss == pytest.approx(want) and m["samples_kept"] == kept
    assert (grad[1, 0] == 0) == overlong and (grad[2, 0] == 0) == garble


def test_everything_masked_gives_zero_loss_with_a_graph():
    loss, grad, m = run([[0.0]], [[0.0]], [1.0], settings=PLAIN, truncated=torch.tensor([True]))
    assert loss == 0 and grad.abs().sum() == 0 and m["tokens"] == 0


# ---- garble filter ----

def test_garble_invalid_characters():
    keep, reason = garble_check([1, 2, 3], "ok \ufffd\ufffd")  # 2 of 5 characters are U+FFFD
    assert not keep and reason.startswith("invalid characters: 0.400")
    assert not garble_check([1], "\x00\x01abc")[0]  # NUL and SOH are control characters
    assert garble_check([1], "tab\tnew\nline\r ok")[0]


def test_garble_token_run():
    assert garble_check([7] + [5] * 32)[0]  # 32 in a row is the limit
    keep, reason = garble_check([7] + [5] * 33)
    assert not keep and reason == "token run: one token 33 times in a row > 32"


def test_garble_repeated_ngrams():
    loop = list(range(10)) * 8  # 80 tokens, 73 8-grams of which only the first 10 are new: 63/73 = 0.863
    assert repeated_ngram_share(loop, 8) == pytest.approx(63 / 73)
    keep, reason = garble_check(loop)
    assert not keep and reason.startswith("repeated 8-grams: 0.863")
    assert garble_check(list(range(80)))[0]  # no n-gram repeats
    assert garble_check(list(range(10)) * 6)[0]  # 60 tokens: below min_tokens_for_ngram
    assert not garble_check(list(range(10)) * 6, rules=GarbleRules(min_tokens_for_ngram=50))[0]
    assert garble_check([])[0]


# ---- dynamic sampling ----

def groups(*rewards):
    return [SimpleNamespace(rewards=list(r)) for r in rewards]


def test_informative():
    assert informative([0, 1]) and informative([0.5, 0.25])
    assert not informative([1, 1, 1]) and not informative([]) and not informative([0.5, 0.5])


def test_dynamic_sampling_refills_to_the_batch_size():
    draws = iter([groups((1, 1), (0, 1), (0, 0)), [], groups((1, 0), (0.5, 0.5), (0, 1), (1, 0))])
    out = fill_batch(lambda: next(draws), batch_groups=3)
    # draw 1 keeps (0, 1) and drops 2; draw 2 is empty; draw 3 keeps (1, 0), (0, 1), carries the last (1, 0)
    assert [g.rewards for g in out.groups] == [[0, 1], [1, 0], [0, 1]]
    assert [g.rewards for g in out.carry] == [[1, 0]]
    assert out.dropped == 3 and out.draws == 3
    nxt = fill_batch(lambda: pytest.fail("the carry alone fills a batch of 1"), batch_groups=1, carry=out.carry)
    assert [g.rewards for g in nxt.groups] == [[1, 0]] and nxt.draws == 0


def test_dynamic_sampling_stops_after_max_draws():
    out = fill_batch(lambda: groups((1, 1)), batch_groups=2, max_draws=5)
    assert out.groups == [] and out.draws == 5 and out.dropped == 5
