"""The C++ stack (csrc/decode_stack.h) for T > 1 tokens with explicit slots and a mask: tree verification
(MiniCPM4ForCausalLM.forward_masked) and the EAGLE draft layer, against the Python layers of model/decoder.py.

As in test_native.py, bf16 paths are compared with the fp32 model they both approximate: the native path must be
as close to it as the Python path is. The tiny MiniCPM4 config exercises muP scaling and GQA groups of 4."""

import copy

import pytest
import torch
from model_util import random_model

from minicpm4.config import tiny
from minicpm4.model.kv_cache import KVCache
from minicpm4.model.native_stack import attach
from minicpm4.spec.eagle import EagleDraft
from minicpm4.spec.tree import DraftTree, causal_mask, tree_mask

pytestmark = pytest.mark.usefixtures("one_thread")

PARENTS = [-1, 0, 0, 0, 2, 1, 2, 6, 7, 3]  # root, three children, deeper branches


@pytest.fixture(scope="module")
def model32():
    return random_model(tiny(), seed=3)


@pytest.fixture
def models(model32, tier):
    """The fp32 model and its bf16 copy on the C++ stack of each instruction-set tier (tests/conftest.py)."""
    m16 = attach(copy.deepcopy(model32).to(torch.bfloat16))
    assert m16.native is not None, "the C++ decode stack did not build (needs a C++ compiler and ninja)"
    return model32, m16


def _verify(model, prompt: torch.Tensor, tree: DraftTree, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `prompt` [n] with a causal mask, then verify `tree` after it: (tree logits [N, V], cache keys)."""
    n = prompt.numel()
    cache = KVCache(model.config, 1, 64, dtype)
    with torch.inference_mode():
        model.forward_masked(prompt[None], torch.arange(n)[None], cache, 0, causal_mask(n, 0)[None])
        logits, _ = model.forward_masked(tree.tokens[None], (n + tree.depths)[None], cache, n, tree_mask(tree, n)[None])
    return logits[0], cache.k[:, :, :, :n + len(tree)].float()


def test_native_tree_verification_is_as_accurate_as_the_python_layers(models):
    m32, m16 = models
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 512, (30,), generator=g)
    tree = DraftTree(torch.randint(0, 512, (len(PARENTS),), generator=g), PARENTS)
    truth, k_truth = _verify(m32, prompt, tree, torch.float32)
    native, k_native = _verify(m16, prompt, tree, torch.bfloat16)
    saved, m16.native = m16.native, None
    try:
        python, k_python = _verify(m16, prompt, tree, torch.bfloat16)
    finally:
        m16.native = saved
    err_native, err_python = (native - truth).abs().mean(), (python - truth).abs().mean()
    assert err_native <= 1.25 * err_python, (err_native, err_python)
    assert (native.argmax(-1) == truth.argmax(-1)).float().mean() >= (python.argmax(-1) == truth.argmax(-1)).float().mean() - 0.1
    # keys went to slots n..n+N-1 (not to the nodes' positions), rotated by the positions
    assert (k_native - k_truth).abs().mean() <= 1.25 * (k_python - k_truth).abs().mean() + 1e-6


def test_native_draft_layer_agrees_with_the_python_layer(models):
    """The draft's cached passes (its root pass, then a level of tree candidates with a mask) through C++."""
    m32, m16 = models
    d32 = EagleDraft.for_target(m32, seed=1)
    d16 = copy.deepcopy(d32).to(torch.bfloat16).bind(m16).fuse()
    assert d16.native is not None
    g = torch.Generator().manual_seed(1)
    ids, feats = torch.randint(0, 512, (1, 6), generator=g), torch.randn(1, 6, m32.config.hidden_size, generator=g)
    mask2 = torch.zeros(1, 3, 9, dtype=torch.bool)
    mask2[:, :, :6] = True
    mask2[0, torch.arange(3), 6 + torch.arange(3)] = True  # three siblings: each sees the prefix and itself

    def run(draft, dtype):
        cache = draft.new_cache(16, dtype)
        with torch.inference_mode():
            a, _ = draft(ids, feats, torch.arange(6)[None], cache, 0, causal_mask(6, 0)[None])
            b, _ = draft(ids[:, :3], feats[:, :3], torch.full((1, 3), 6), cache, 6, mask2)
        return torch.cat([a, b], 1)

    truth, native = run(d32, torch.float32), run(d16, torch.bfloat16)
    d16.native = None
    python = run(d16, torch.bfloat16)
    assert (native - truth).abs().mean() <= 1.25 * (python - truth).abs().mean()
    assert (native - python).abs().mean() <= 1.5 * (python - truth).abs().mean()


def test_native_tree_verification_runs_int4_layers(smollm_gguf, real_text):
    """The default GGUF with Q4_1 layers kept quantized (Int4Linear, Int8Linear head): the speculative path of
    `generate --int4 --draft`, native against the Python layers on the same weights."""
    import minicpm4
    m, tok = minicpm4.load(smollm_gguf, dtype="bf16", int4=True)
    attach(m)
    assert m.native is not None
    ids = tok.encode(real_text)
    tree = DraftTree(torch.tensor(ids[40:40 + len(PARENTS)]), PARENTS)
    native, _ = _verify(m, torch.tensor(ids[:40]), tree, torch.bfloat16)
    m.native = None
    python, _ = _verify(m, torch.tensor(ids[:40]), tree, torch.bfloat16)
    assert (native.argmax(-1) == python.argmax(-1)).float().mean() >= 0.9
    assert (native - python).abs().mean() < 0.1 * python.abs().mean()
