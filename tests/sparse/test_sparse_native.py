"""The C++ InfLLM v2 kernels (csrc/sparse_attention.*, sparse/native.py) against their pure-PyTorch references
(sparse_decode.select_one + attend_one; the chunked path of sparse.infllmv2_attention), bf16.

The decode step rounds where the reference rounds (bf16 stage-1 dot products, fp32 softmax, bf16 probabilities
and output) and differs only in summation order; the prefill kernel's online softmax keeps probabilities in fp32
(csrc/sparse_prefill.h). So selections are equal and outputs agree to a bf16 ulp or two."""

import pytest
import torch

from minicpm4 import kernels
from minicpm4.config import ModelConfig, tiny
from minicpm4.model.decoder import MiniCPM4ForCausalLM, dense_attention
from minicpm4.model.kv_cache import KVCache
from minicpm4.model.native_stack import attach
from minicpm4.sparse.attention import infllmv2_attention
from minicpm4.sparse.decode import attend_one, select_one
from minicpm4.sparse.select import SparseConfig, compress_both, pad_kernels, select_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, init_blocks=1, topk=6, dense_len=-1)
PAPER = dict(kernel_size=32, kernel_stride=16, block_size=64, window_size=256, init_blocks=1, topk=8, dense_len=-1)


@pytest.fixture
def ext(tier):
    """The kernels of each instruction-set tier this CPU runs (tests/conftest.py), each its own code path."""
    return kernels.native()


def _case(b, h, kvh, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, qs = (torch.randn(b, h, 1, d, generator=g).bfloat16() for _ in range(2))
    # cache slices of a longer buffer, as KVCache hands them out (non-contiguous rows)
    k, v = (torch.randn(b, kvh, s + 40, d, generator=g).bfloat16()[:, :, :s] for _ in range(2))
    return q, qs, k, v


def _both(ext, q, qs, k, v, t, cfg):
    cfg = SparseConfig(**cfg)
    c1, c2 = (pad_kernels(c) for c in compress_both(k, cfg))
    k_sel = cfg.n_select(-(-int(t.max() + 1) // cfg.block_size))
    idx_ref = select_one(qs, t, c1, c2, cfg, k_sel)
    out_ref = attend_one(q, k, v, t, idx_ref, cfg.block_size)
    bsz, h, _, d = q.shape
    out, idx = ext.sparse_decode(q.reshape(bsz, h, d).contiguous(), qs.reshape(bsz, h, d).contiguous(), k, v, c1, c2, t,
                          cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.init_blocks, cfg.local_blocks, k_sel)
    return (out.view_as(out_ref), idx), (out_ref, idx_ref)


def _assert_close(out, ref):
    diff = (out.float() - ref.float()).abs()
    # 2 bf16 ulps of the largest output: summation order is the only difference
    assert diff.max() <= 2 * 2.0 ** -8 * ref.float().abs().max(), diff.max()


@pytest.mark.parametrize("h,kvh,d,s,cfg", [
    (16, 2, 64, 3001, PAPER),   # MiniCPM4-0.5B: group 8
    (16, 1, 128, 1500, PAPER),  # group 16, head_dim 128
    (9, 3, 64, 777, SMALL),     # the default model: group 3; odd length
    (4, 4, 80, 300, SMALL),     # no GQA; head_dim not a multiple of 32 (the scalar loops)
])
def test_native_step_equals_reference(ext, h, kvh, d, s, cfg):
    q, qs, k, v = _case(1, h, kvh, s, d, seed=s)
    t = torch.tensor([s - 1])
    (out, idx), (out_ref, idx_ref) = _both(ext, q, qs, k, v, t, cfg)
    assert torch.equal(idx, idx_ref)
    _assert_close(out, out_ref)


def test_native_ragged_rows_and_threads(ext):
    """Rows at different positions (one short enough that no coarse kernel is complete, so every block scores 0
    and ties decide), on two threads."""
    q, qs, k, v = _case(3, 16, 2, 900, 64, seed=5)
    t = torch.tensor([899, 517, 40])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (out, idx), (out_ref, idx_ref) = _both(ext, q, qs, k, v, t, SMALL)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(idx, idx_ref)
    assert (idx[2] == -1).any()  # the 41-key row has fewer blocks than the selection size
    _assert_close(out, out_ref)


def test_infllmv2_decode_uses_native_and_falls_back(ext, monkeypatch):
    """infllmv2_attention's decode step: the native kernel and the MINICPM4_NATIVE=0 fallback agree; with
    use_nope the stage-1 inputs are the pre-RoPE ones."""
    q, qs, k, v = _case(1, 16, 2, 2000, 64, seed=1)
    cfg = dict(PAPER, use_nope=True)
    k_nope = torch.randn_like(k)
    with torch.no_grad():
        fast = infllmv2_attention(q, k, v, q_nope=qs, k_nope=k_nope, **cfg)
        monkeypatch.setenv("MINICPM4_NATIVE", "0")
        slow = infllmv2_attention(q, k, v, q_nope=qs, k_nope=k_nope, **cfg)
        other = infllmv2_attention(q, k, v, q_nope=q, k_nope=k, **cfg)
    _assert_close(fast, slow)
    assert not torch.equal(slow, other)  # the stage-1 inputs matter, so the check above is not vacuous


def _decode(model, ids, n, steps, cfg):
    """Prefill ids[:, :n] (2 rows), then one token per row per step, row 1 five positions behind (it rewrites
    cached keys, so the compressed keys must follow). -> (logits [2, steps, V], cache)."""
    cache = KVCache(cfg, 2, ids.shape[1], dtype=torch.bfloat16)
    out = []
    with torch.no_grad():
        # the prefill on the Python layers, as an InfLLM v2 model's always is (its C++ stack takes one token per
        # row), so that runs with and without the stack differ in their decode steps alone
        stack, model.native = model.native, None
        model(ids[:, :n], cache=cache)
        model.native = stack
        for s in range(steps):
            pos = torch.tensor([[n + s], [n + s - 5]])
            out.append(model(torch.stack([ids[0, n + s], ids[1, n + s - 5]])[:, None], positions=pos, cache=cache)[:, -1])
    return torch.stack(out, 1), cache


def test_native_model_decode_runs_sparse_and_keeps_compressed_keys(tier):
    """A bf16 InfLLM v2 model's decode steps through the C++ stack (dense below dense_len, the sparse step from
    then on) agree with the Python layers, and the compressed keys the stack maintains equal pooling the cache."""
    sparse = dict(SMALL, topk=3, window_size=16, dense_len=200)  # 4 blocks of 16 keys: far from dense
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": sparse})
    torch.manual_seed(0)
    model = attach(MiniCPM4ForCausalLM(cfg).eval().to(torch.bfloat16))
    assert model.native is not None and model.native.sparse is not None, "the C++ decode stack did not build"
    ids = torch.randint(0, 512, (2, 270))
    native_logits, cache = _decode(model, ids, 150, 115, cfg)
    stack = model.native
    model.native = None
    python_logits, _ = _decode(model, ids, 150, 115, cfg)
    scale = python_logits.abs().mean()
    assert (native_logits - python_logits).abs().mean() < 0.02 * scale
    assert (native_logits.argmax(-1) == python_logits.argmax(-1)).float().mean() >= 0.9
    # keys each row holds after the last step; `covered` reaches them only through the stack's sparse step (the
    # prefill ran below dense_len, and dense steps only lower it)
    store, lens = cache.compressed, [265, 260]
    for layer in range(cfg.num_hidden_layers):
        assert store.covered[layer].tolist() == lens
        for b, n in enumerate(lens):
            for c, ref in zip(store.c, compress_both(cache.k[layer, b:b + 1, :, :n], SparseConfig(**sparse))):
                torch.testing.assert_close(c[layer, b:b + 1, :, :ref.shape[2]], ref, atol=0, rtol=0)
    # the same weights, dense attention, a cache without compressed keys: the dense C++ stack runs the same steps
    # below dense_len
    model.set_attention_backend(dense_attention)
    attach(model)
    assert model.native is not None and model.native.sparse is None and stack.sparse is not None
    dense_cfg = ModelConfig.from_dict({**cfg.to_dict(), "sparse_config": None})
    dense_logits, dense_cache = _decode(model, ids, 150, 115, dense_cfg)
    assert dense_cache.compressed is None
    assert torch.equal(dense_logits[:, :40], native_logits[:, :40])


@pytest.mark.parametrize("h,kvh,d,cfg", [(16, 2, 64, SMALL), (9, 3, 128, SMALL), (16, 1, 64, PAPER)])
def test_native_chunk_equals_the_chunked_reference(ext, h, kvh, d, cfg, monkeypatch):
    """Queries after a cached prefix, two rows of different lengths: each query's blocks equal select_blocks', and
    the output equals the reference's union-of-blocks attention."""
    g = torch.Generator().manual_seed(d)
    s, t = 700, 260
    q = torch.randn(2, h, t, d, generator=g).bfloat16()
    k, v = (torch.randn(2, kvh, s, d, generator=g).bfloat16() for _ in range(2))
    positions = torch.stack([torch.arange(s - t, s), torch.arange(s - t - 93, s - 93)])
    kv_lens = torch.tensor([s, s - 93])
    conf = SparseConfig(**cfg)
    c1, c2 = (pad_kernels(c) for c in compress_both(k, conf))
    k_sel = conf.n_select(-(-s // conf.block_size))
    _, idx = ext.sparse_prefill(q, q, k, v, c1, c2, positions, conf.kernel_size, conf.kernel_stride, conf.block_size,
                         conf.init_blocks, conf.local_blocks, k_sel, True)
    assert torch.equal(idx, select_blocks(q, k, positions, conf, kv_lens=kv_lens).long())
    with torch.no_grad():
        fast = infllmv2_attention(q, k, v, positions, kv_lens=kv_lens, **cfg)
        monkeypatch.setenv("MINICPM4_NATIVE", "0")
        slow = infllmv2_attention(q, k, v, positions, kv_lens=kv_lens, **cfg)
    _assert_close(fast, slow)


def test_native_chunked_prefill_through_the_model(tier, monkeypatch):
    """A bf16 sparse model prefilling in chunks through its KV cache (compressed keys from the cache): the C++
    chunk kernel and the PyTorch path give the same logits up to bf16 rounding."""
    sparse = dict(SMALL, topk=3, window_size=16, dense_len=64)
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": sparse})
    torch.manual_seed(1)
    model = MiniCPM4ForCausalLM(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 240))

    def prefill():
        cache = KVCache(cfg, 2, 240, dtype=torch.bfloat16)
        with torch.no_grad():
            return torch.cat([model(ids[:, i:i + 80], positions=torch.arange(i, i + 80).expand(2, 80), cache=cache)
                              for i in range(0, 240, 80)], 1)
    fast = prefill()
    monkeypatch.setenv("MINICPM4_NATIVE", "0")
    slow = prefill()
    assert (fast - slow).abs().mean() < 0.02 * slow.abs().mean()
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.9
