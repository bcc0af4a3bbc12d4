"""Chunk-wise rollout through the real Engine on tiny random models: chunk bookkeeping across policy versions,
vanilla = chunk-wise under a fixed policy, EOS, idle slots, and the batch the learner builds from it."""

import pytest
import torch
from model_util import random_model

from minicpm4.config import tiny
from minicpm4.engine.engine import Engine
from minicpm4.errors import InputError
from minicpm4.train.rl.batch import batch_loss, collate, from_groups
from minicpm4.train.rl.logprobs import token_logprobs
from minicpm4.train.rl.loss import LossSettings
from minicpm4.train.rl.reference import ReferenceModel
from minicpm4.train.rl.rollout import ChunkRollout, RolloutSettings, Sample, idle_share

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [("a", [5, 6, 7, 8, 9]), ("b", [10, 11, 12])]


@pytest.fixture(scope="module")
def models():
    return [random_model(tiny(), seed=s) for s in range(3)]  # policy versions 0, 1, 2


def rollout(model, chunk, max_len=12, stop=(), seed=0):
    # stop=(): no stop token, so every sample runs to max_len (unless a test names one)
    return ChunkRollout(Engine(model, max_slots=8),
                        RolloutSettings(group_size=2, chunk_tokens=chunk, max_len=max_len, seed=seed,
                                        stop_token_ids=stop))


def three_policy_rollout(models):
    policy = random_model(tiny(), seed=0)
    ro = rollout(policy, chunk=4)
    per_round = []
    for v in range(3):
        policy.load_state_dict(models[v].state_dict())  # the learner's update between rounds
        per_round.append(ro.round(PROMPTS if v == 0 else [], version=v))
    return ro, per_round


def test_three_chunks_carry_the_logprobs_of_three_policies(models):
    ro, per_round = three_policy_rollout(models)
    assert per_round[0] == [] and per_round[1] == []  # 12 tokens in chunks of 4: nothing finishes before round 3
    groups = per_round[2]
    assert [g.key for g in groups] == ["a", "b"] and ro.buffer == [] and ro.finished == {}
    # prefill per round: round 1 the prompts (2x5 + 2x3 = 16), then prompt + 4 and + 8 generated tokens (32, 48)
    assert [(h.resumed, h.prefill_tokens, h.finished) for h in ro.history] == [(0, 16, 0), (4, 32, 0), (4, 48, 4)]
    for g in groups:
        for smp in g.samples:
            assert len(smp.tokens) == 12 and smp.truncated
            assert smp.versions == [0] * 4 + [1] * 4 + [2] * 4
            assert smp.chunks() == [(0, 0, 4), (1, 4, 8), (2, 8, 12)]
            ids = torch.tensor([smp.prompt + smp.tokens])
            stored = torch.tensor(smp.logprobs)
            p = len(smp.prompt)
            for v, start, end in smp.chunks():
                for w, model in enumerate(models):
                    with torch.no_grad():
                        lp = token_logprobs(model, ids)[0, p - 1 + start:p - 1 + end]  # full forward, temperature 1
                    close = torch.allclose(lp, stored[start:end], atol=1e-4, rtol=0)
                    # exactly the producing policy's log-probs, and no other version's
                    assert close == (w == v), (smp.key, smp.index, v, w, (lp - stored[start:end]).abs().max())


def test_vanilla_equals_chunkwise_under_a_fixed_policy(models):
    vanilla = rollout(models[0], chunk=12)
    chunked = rollout(models[0], chunk=4)
    got_v = vanilla.round(PROMPTS, version=0)
    got_c = [g for v in range(3) for g in chunked.round(PROMPTS if v == 0 else [], version=0)]
    assert len(vanilla.history) == 1 and len(chunked.history) == 3
    for gv, gc in zip(got_v, got_c, strict=True):
        for sv, sc in zip(gv.samples, gc.samples, strict=True):
            assert sv.tokens == sc.tokens and sv.finish_reason == sc.finish_reason
            torch.testing.assert_close(torch.tensor(sv.logprobs), torch.tensor(sc.logprobs), atol=1e-4, rtol=0)
    # the two samples of a group draw from different seeds
    assert got_v[0].samples[0].tokens != got_v[0].samples[1].tokens


def test_eos_ends_a_sample_where_it_is_sampled(models):
    free = rollout(models[0], chunk=12).round(PROMPTS, version=0)  # vanilla, no stop token
    free = {(s.key, s.index): s.tokens for g in free for s in g.samples}
    stop = free[("a", 0)][5]  # a token sample a/0 draws in its second chunk
    ro = rollout(models[0], chunk=4, stop=(stop,))
    groups = [g for v in range(3) for g in ro.round(PROMPTS if v == 0 else [], version=0)]
    for g in groups:
        for s in g.samples:
            want = free[(s.key, s.index)]
            if stop in want:  # same seeds: the same draws, cut at the first stop token (kept: it is trained on)
                k = want.index(stop)
                assert s.tokens == want[:k + 1] and s.finish_reason == "stop" and not s.truncated
            else:
                assert s.tokens == want and s.truncated
    assert len(groups) == 2 and ro.buffer == []


def test_idle_share():
    # 2 slots for 4 steps, tokens produced by 2, 1, 1, 1 of them: 5 busy slot-steps of 8 -> 3/8 idle
    assert idle_share(busy=5, steps=4, slots=2) == 0.375
    assert idle_share(0, 0, 4) == 0.0


def test_idle_share_of_real_rounds(models):
    # no stop token and equal chunks: every request gets a token every step of its round -> no idle slot
    ro, _ = three_policy_rollout(models)
    assert [h.idle_share for h in ro.history] == [0.0, 0.0, 0.0]
    # a stop token that ends some samples early leaves their slots idle while the others finish
    free = rollout(models[0], chunk=12).round(PROMPTS, version=0)
    stop = free[0].samples[0].tokens[1]
    ro = rollout(models[0], chunk=12, stop=(stop,))
    ro.round(PROMPTS, version=0)
    h = ro.history[0]
    assert 0 < h.idle_share < 1 and h.idle_share == 1 - h.busy / (h.steps * h.slots)


def test_refill_round_fills_to_max_active(models):
    ro = rollout(models[0], chunk=4)
    source = iter([(k, [3 + k, 4]) for k in range(10)])
    ro.refill_round(source, version=0, max_active=5)  # 5 // G=2 -> 2 new prompts, 4 samples
    assert ro.history[-1].requests == 4 and ro.active == 4
    ro.refill_round(source, version=1, max_active=5)  # 4 in flight, room for 1 sample < G: none new
    assert ro.history[-1].requests == 4 and next(source)[0] == 2  # prompts 0 and 1 taken, nothing else


def test_bad_prompts_are_refused(models):
    ro = rollout(models[0], chunk=4, max_len=12)
    with pytest.raises(InputError, match="does not fit"):
        ro.round([("long", [1] * 2040)], version=0)  # 2040 + 12 + 1 > 2048 positions
    ro.round([("k", [1, 2])], version=0)
    buffered = list(ro.buffer)
    for bad, match in (([("k", [1, 2])], "already in flight"), ([("n", [3]), ("n", [4])], "already in flight"),
                       ([("ok", [3]), ("v", [512])], "outside the vocabulary"), ([("e", [])], "empty")):
        with pytest.raises(InputError, match=match):
            ro.round(bad, version=1)
        # refused before anything changed: the buffer, the keys in flight, the engine's queue
        assert ro.buffer == buffered and set(ro.prompts) == {"k"} and not ro.backend.engine.has_work


def test_collate_layout():
    s1 = Sample("x", 0, [1, 2, 3], torch.Generator(), tokens=[4, 5], logprobs=[-0.1, -0.2], versions=[0, 1],
                finish_reason="stop")
    s2 = Sample("y", 0, [7], torch.Generator(), tokens=[8], logprobs=[-0.3], versions=[2], finish_reason="length")
    b = collate([s1, s2], pad_id=0)
    # position j predicts token j+1: s1's response tokens 4, 5 are the targets of positions 2, 3; s2's 8 of 0
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert b.mask.tolist() == [[False, False, True, True], [True, False, False, False]]
    torch.testing.assert_close(b.behavior_logp, torch.tensor([[0, 0, -0.1, -0.2], [-0.3, 0, 0, 0]]))
    assert b.versions.tolist() == [[-1, -1, 0, 1], [2, -1, -1, -1]]
    assert b.truncated.tolist() == [False, True]


def test_right_padding_does_not_change_logprobs(models):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    with torch.no_grad():
        both = token_logprobs(models[0], ids)
        alone = token_logprobs(models[0], ids[1:, :2])
    torch.testing.assert_close(both[1, :1], alone[0], atol=1e-5, rtol=0)


def test_reference_refreshes_every_n_steps(models):
    policy = random_model(tiny(), seed=0)
    ref = ReferenceModel(policy, refresh_every=2)
    policy.load_state_dict(models[1].state_dict())
    assert not ref.maybe_refresh(policy, step=1)
    assert torch.equal(ref.model.lm_head.weight, models[0].lm_head.weight)
    assert ref.maybe_refresh(policy, step=2) and not ref.maybe_refresh(policy, step=2)
    assert torch.equal(ref.model.lm_head.weight, models[1].lm_head.weight)
    assert not any(p.requires_grad for p in ref.model.parameters())


def test_loss_on_a_rollout_batch(models):
    # the objective's path: rollout -> rewards -> batch -> loss, under the policy that sampled everything
    ro = rollout(models[0], chunk=12)
    groups = ro.round(PROMPTS, version=0)
    for g, r in zip(groups, ([1.0, 0.0], [0.0, 0.0])):
        g.rewards = r
    batch = from_groups(groups)
    # group a: rewards 1, 0 -> advantages +-0.7071 (mean 0.5, unbiased std 0.7071); group b: all equal -> 0
    torch.testing.assert_close(batch.advantages, torch.tensor([0.7071, -0.7071, 0.0, 0.0]), atol=1e-4, rtol=0)
    s = LossSettings(overlong_filter=False, kl_coef=0.0)  # every sample here is truncated at max_len
    model = random_model(tiny(), seed=0)
    loss, m = batch_loss(model, batch, s)
    loss.backward()
    # same weights as the sampler: every ratio is 1 (to fp32 rounding), nothing clipped
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and m["clip_low"] == m["clip_high"] == 0
    assert m["tokens"] == 4 * 12 and model.lm_head.weight.grad.abs().sum() > 0
    # with overlong filtering on, all four (truncated) samples leave the loss
    assert batch_loss(model, batch, LossSettings(kl_coef=0.0))[1]["samples_kept"] == 0


def streamed(policy, models, stop, steps=12):
    # draw/end_step, a training step's rollout on the engine: each step loads models[step % len(models)] into the
    # policy (the learner's update), ends as soon as one group is complete and cuts the samples still running (3
    # groups in flight on 4 slots; chunk_tokens 11 of max_len 12, so a sample rarely spends its budget)
    prompts = [(k, [3 + k, 4 + k, 5]) for k in range(6)]
    ro = ChunkRollout(Engine(policy, max_slots=4),
                      RolloutSettings(group_size=2, chunk_tokens=11, max_len=12, stop_token_ids=(stop,)))
    source, got, cut = iter(prompts), [], 0
    for step in range(steps):
        policy.load_state_dict(models[step % len(models)].state_dict())
        got += ro.draw(source, version=step, max_active=6, groups=1)
        running = [smp for smp, _ in ro.backend.live.values()]
        ro.end_step()
        cut += sum(len(smp.tokens) > 0 and smp.finish_reason is None for smp in running)  # kept what it sampled
    assert cut > 0 and sorted(g.key for g in got) == list(range(6)) and ro.buffer == []
    return prompts, got


def test_streamed_steps_carry_the_logprobs_of_their_policies(models):
    free = rollout(models[0], chunk=12).round(PROMPTS, version=0)
    stop = free[0].samples[0].tokens[2]  # lengths vary: some samples stop early, others run to max_len
    _, got = streamed(random_model(tiny(), seed=0), models, stop)
    spans = 0
    for smp in (s for g in got for s in g.samples):
        ids, p = torch.tensor([smp.prompt + smp.tokens]), len(smp.prompt)
        spans += len(smp.chunks()) > 1
        for v, start, end in smp.chunks():  # a sample cut at a step's end goes on under the next step's policy
            with torch.no_grad():
                lp = token_logprobs(models[v % 3], ids)[0, p - 1 + start:p - 1 + end]
            torch.testing.assert_close(lp, torch.tensor(smp.logprobs[start:end]), atol=1e-4, rtol=0)
    assert spans > 0


def test_cut_samples_resume_to_what_vanilla_samples(models):
    # cut and resumed under a fixed policy, a sample is exactly what uncut vanilla rollout samples
    free = rollout(models[0], chunk=12).round(PROMPTS, version=0)
    stop = free[0].samples[0].tokens[2]
    prompts, got = streamed(random_model(tiny(), seed=0), models[:1], stop)
    vanilla = {g.key: g for g in rollout(models[0], chunk=12, stop=(stop,)).round(prompts, version=0)}
    for g in got:
        for s, w in zip(g.samples, vanilla[g.key].samples, strict=True):
            assert s.tokens == w.tokens and s.finish_reason == w.finish_reason
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)


def test_a_step_whose_samples_all_spent_their_budget_goes_on(models):
    # max_active 4 = the two groups in flight, each sample 12 tokens at 4 a step: every sample spends its budget
    # with no group complete and no room for a new one, so they go on in the same step with a fresh budget
    ro = rollout(models[0], chunk=4)
    got = ro.draw(iter(PROMPTS), version=0, max_active=4, groups=2)
    ro.end_step()
    assert [g.key for g in got] == ["a", "b"] and ro.buffer == [] and ro.history[-1].resumed == 8
    assert all(s.versions == [0] * 12 for g in got for s in g.samples)
