"""Speculative decoding: tree verification, KV compaction, greedy equality, acceptance, sampling exactness."""

import copy

import pytest
import torch
from model_util import random_model

from minicpm4.config import ModelConfig, tiny
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.model.kv_cache import KVCache
from minicpm4.spec.chain import ChainDrafter
from minicpm4.spec.decoder import SpeculativeDecoder, next_token
from minicpm4.spec.eagle import EagleDraft
from minicpm4.spec.tree import DraftTree, EagleDrafter, best_subtree, tree_mask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return random_model(tiny(), seed=0)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 500, (17,), generator=torch.Generator().manual_seed(5)).tolist()


def plain_greedy(model, prompt, n):
    return Engine(model).generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids


def spec_greedy(model, drafter, prompt, n):
    return SpeculativeDecoder(model, drafter).generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]


# a tree: 0 root; 1, 2, 3 children of the root; 4, 6 children of 2; 5 child of 1; 7 child of 6
PARENTS = [-1, 0, 0, 0, 2, 1, 2, 6]


def test_tree_mask_is_ancestor_relation():
    tree = DraftTree(torch.arange(8), PARENTS)
    m = tree.mask()
    for i in range(8):
        anc, a = {i}, i
        while PARENTS[a] >= 0:
            a = PARENTS[a]
            anc.add(a)
        assert {j for j in range(8) if m[i, j]} == anc
    assert tree.depths.tolist() == [0, 1, 1, 1, 2, 2, 2, 3]
    full = tree_mask(tree, 5)
    assert full.shape == (8, 13) and bool(full[:, :5].all()) and torch.equal(full[:, 5:], m)


def test_tree_verification_equals_plain_forward_of_each_path(target, prompt):
    """Logits of every tree node in one masked pass = the last logits of a plain forward over prefix + its path."""
    model = copy.deepcopy(target).float()
    n = len(prompt)
    cache = KVCache(model.config, 1, 64)
    model(torch.tensor([prompt]), cache=cache)
    tokens = torch.tensor([7, 40, 41, 42, 50, 51, 52, 60])
    tree = DraftTree(tokens, PARENTS)
    logits, _ = model.forward_masked(tokens[None], (n + tree.depths)[None], cache, n, tree_mask(tree, n)[None])
    for i in range(8):
        path, a = [], i
        while a >= 0:
            path.insert(0, int(tokens[a]))
            a = PARENTS[a]
        ref = model(torch.tensor([prompt + path]))[0, -1]
        torch.testing.assert_close(logits[0, i], ref, atol=1e-4, rtol=1e-4)
    # logits_to_keep=2: the last two nodes' logits only, every node's features
    last, h_all = model.forward_masked(tokens[None], (n + tree.depths)[None], cache, n, tree_mask(tree, n)[None],
                                       logits_to_keep=2)
    assert last.shape == (1, 2, model.config.vocab_size) and h_all.shape[1] == 8
    torch.testing.assert_close(last[0], logits[0, -2:])


def test_kv_compaction_moves_path_slots():
    cfg = tiny()
    cache = KVCache(cfg, 1, 32)
    for buf in (cache.k, cache.v):
        buf.copy_(torch.arange(32.0).view(1, 1, 1, 32, 1).expand_as(buf) + torch.rand_like(buf) * 0)
    before_k = cache.k.clone()
    cache.compact(10, torch.tensor([0, 2, 6, 7]))
    assert torch.equal(cache.k[..., 10:14, :], before_k[..., [10, 12, 16, 17], :])
    assert torch.equal(cache.v[..., 10:14, :], before_k[..., [10, 12, 16, 17], :])
    assert torch.equal(cache.k[..., :10, :], before_k[..., :10, :])  # the prefix is untouched


class OracleDrafter:
    """A tree whose second child of the root starts the true greedy continuation (3 deep), with distractor
    siblings that repeat the true tokens in the wrong places: a mask leak or a bad compaction would show."""

    extra_slots = 8

    def __init__(self, reference):
        self.ref = reference

    def begin(self, max_len, dtype):
        pass

    def commit(self, ids, start, features):
        pass

    def propose(self, ids, params, generator):
        t = (self.ref[len(ids):len(ids) + 3] + [1, 1, 1])[:3]
        w = [(x + 1) % 512 for x in t]
        return DraftTree(torch.tensor([ids[-1], w[0], t[0], w[0] ^ 2, w[1], t[1], t[1], t[2]]), PARENTS)


def test_greedy_tree_with_partial_acceptance_equals_plain_greedy(target, prompt):
    ref = plain_greedy(target, prompt, 30)
    out = spec_greedy(target, OracleDrafter(prompt + ref), prompt, 30)
    assert out.token_ids == ref
    assert out.accepted[:-1] == [4] * (len(out.accepted) - 1)  # root -> 2 -> 6 -> 7, then the bonus token


def test_target_as_its_own_chain_draft_accepts_everything(target, prompt):
    ref = plain_greedy(target, prompt, 31)
    out = spec_greedy(target, ChainDrafter(target, gamma=4), prompt, 31)
    assert out.token_ids == ref
    assert out.accepted == [5] * 6 and out.mean_accept_length == 5.0  # 1 + 6 * 5 = 31 tokens


@pytest.mark.parametrize("kind", ["chain", "eagle", "eagle-frspec"])
def test_greedy_speculative_equals_plain_greedy(target, prompt, kind):
    ref = plain_greedy(target, prompt, 40)
    if kind == "chain":
        drafter = ChainDrafter(random_model(tiny(), seed=3), gamma=3)
    else:
        draft = EagleDraft.for_target(target, seed=1)
        if kind == "eagle-frspec":
            draft.bind(target, torch.arange(0, 512, 3))
        drafter = EagleDrafter(draft, topk=4, num_iter=3, tree_size=9)
    assert spec_greedy(target, drafter, prompt, 40).token_ids == ref


def test_eagle_tree_shape_and_frspec_vocabulary(target, prompt):
    draft = EagleDraft.for_target(target).bind(target, torch.arange(100, 300))
    drafter = EagleDrafter(draft, topk=5, num_iter=3, tree_size=12)
    drafter.begin(64, torch.float32)
    feats = torch.randn(len(prompt), target.config.hidden_size)
    drafter.commit(prompt + [9], 0, feats)
    tree = drafter.propose(prompt + [9], SamplingParams(), None)
    assert len(tree) == 12 and int(tree.tokens[0]) == 9
    assert all(0 <= p < i for i, p in enumerate(tree.parents) if i)
    assert bool(((tree.tokens[1:] >= 100) & (tree.tokens[1:] < 300)).all())
    assert int(tree.depths.max()) <= 3


def test_best_subtree_keeps_ancestors():
    parents = [-1, -1, 0, 0, 1, 2]
    scores = torch.tensor([-1.0, -0.5, -1.0, -3.0, -0.6, -1.0])  # 2 ties with its parent 0 and child 5
    assert best_subtree(parents, scores, 4) == [0, 1, 2, 4]
    assert best_subtree(parents, scores, 5) == [0, 1, 2, 4, 5]


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_DF7_999 = 24.32  # 99.9% quantile of chi-square with 7 degrees of freedom


def test_rejection_sampling_node_preserves_target_distribution():
    g = torch.Generator().manual_seed(0)
    logits_p = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    q = torch.tensor([0.02, 0.05, 0.40, 0.03, 0.25, 0.05, 0.10, 0.10])
    p = logits_p.softmax(-1)
    params = SamplingParams(temperature=1.0)
    n = 20000
    emitted, proposed = torch.zeros(8), torch.zeros(8)
    qrows = torch.stack([q, q])
    for _ in range(n):
        c = int(torch.multinomial(q, 1, generator=g))
        token, _ = next_token(logits_p, params, torch.tensor([], dtype=torch.long), [1], [c], qrows, g)
        emitted[token] += 1
        proposed[c] += 1
    assert chi2(emitted, p) < CHI2_DF7_999
    assert chi2(proposed, p) > 100 * CHI2_DF7_999  # the draft alone is far from p: the test has power


def small_vocab_model(seed):
    cfg = ModelConfig(model_type="minicpm", vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, scale_emb=1.0,
                      dim_model_base=32, eos_token_id=None)
    m = random_model(cfg, seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(2)  # spread over all 8 tokens, but peaked enough for drafts to be accepted
    return m


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_speculative_sampling_preserves_target_distribution(kind):
    """The second generated token (emitted by verification) follows sum_x1 p(x1) p(x2 | x1)."""
    target = small_vocab_model(0)
    prompt = [1, 5, 2]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = sum(p1[a] * target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(8))
    if kind == "chain":
        drafter = ChainDrafter(small_vocab_model(1), gamma=2)
    else:
        drafter = EagleDrafter(EagleDraft.for_target(target, seed=2), topk=2, num_iter=2, tree_size=4)
    spec = SpeculativeDecoder(target, drafter)
    counts, accepted = torch.zeros(8), 0
    runs = 1000
    for i in range(runs):
        out = spec.generate([prompt], SamplingParams(max_new_tokens=2, temperature=1.0, seed=i))[0]
        counts[out.token_ids[1]] += 1
        accepted += out.accepted[0] > 1
    assert chi2(counts, p2) < CHI2_DF7_999
    assert accepted > runs // 10  # draft tokens were accepted often enough for the test to exercise acceptance


def test_eagle_root_proposal_equals_teacher_forced_draft_prediction(target, prompt):
    """The drafter feeds the draft the same (feature_t, x_{t+1}) pairs at the same positions as training does: its
    first proposal each round is the draft's teacher-forced argmax over prompt + greedy output."""
    ref = plain_greedy(target, prompt, 24)
    seq = torch.tensor([prompt + ref])
    draft = EagleDraft.for_target(target, seed=4)
    kept = []
    hook = target.model.norm.register_forward_hook(lambda mod, inp, out: kept.append(out))
    with torch.no_grad():
        target(seq)
        hook.remove()
        forced = draft(seq[:, 1:], kept[0][:, :-1], torch.arange(seq.shape[1] - 1)[None])[0][0].argmax(-1)
    drafter = EagleDrafter(draft, topk=3, num_iter=2, tree_size=6)
    proposals, propose = [], drafter.propose

    def spy(ids, params, generator):
        tree = propose(ids, params, generator)
        proposals.append((len(ids) - 1, int(tree.tokens[tree.children(0)[0]])))  # the best child of the root
        return tree
    drafter.propose = spy
    assert spec_greedy(target, drafter, prompt, 24).token_ids == ref
    assert len(proposals) > 5
    assert all(tok == int(forced[m - 1]) for m, tok in proposals)  # pair (f_{m-1}, x_m) predicts x_{m+1}
