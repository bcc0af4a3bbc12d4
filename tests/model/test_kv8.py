"""The int8 KV cache (quant/kv8.py, model/kv_cache.py): its rounding, its bytes, the C++ kernels that read it in place
(dense and InfLLM v2 decode, compressed-key pooling) against the dequantize-then-reference path on every tier this
CPU runs, the default model's logits against a bf16 cache, and the engine around it (prefix cache, batching,
speculative decoding's compact).

Tolerances: the kernels and the reference see the same int8 rows and differ in where they round (the kernels scale
fp32 dot products and probabilities by the row scales; the reference rounds q * s to bf16 first), so outputs agree
to a few bf16 ulps and selections are equal. Against a bf16 cache the int8 rounding itself (|x - q s| <= s / 2, s =
max|x| / 127) moves the default model's logits by ~1.4% of their mean magnitude, about what bf16 rounding does."""

import pytest
import torch
from model_util import random_model

import minicpm4
from minicpm4 import kernels
from minicpm4.config import ModelConfig, tiny
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.errors import ConfigError
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.model.kv_cache import KVCache
from minicpm4.model.native_stack import attach
from minicpm4.quant import kv8
from minicpm4.sparse.decode import attend_one, select_one
from minicpm4.sparse.select import SparseConfig, compress_both, pad_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=16, init_blocks=1, topk=3, dense_len=64)
PAPER = dict(kernel_size=32, kernel_stride=16, block_size=64, window_size=256, init_blocks=1, topk=8, dense_len=-1)


def test_rounding_is_symmetric_to_nearest_even_with_absmax_scale():
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -127.0, 0.4], [0.0] * 6])
    q, s = kv8.quantize(x)
    assert s.tolist() == [1.0, 0.0]  # max|x| / 127; an all-zero row gets scale 0 and q = 0
    assert q.tolist() == [[127, 2, 4, -2, -127, 0], [0] * 6]  # halves to even
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-3, 3, 5)[:, None]
    q, s = kv8.quantize(x.bfloat16())
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (kv8.dequantize(q, s, torch.float32) - x.bfloat16().float()).abs()
    assert bool((err <= s[..., None] / 2 * (1 + 1e-6)).all())


def test_int8_cache_bytes_and_unknown_dtype():
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                                 "hidden_size": 256})
    assert cfg.head_dim == 64
    b16, i8 = (KVCache(cfg, 2, 1024, torch.bfloat16, device="meta", kv_dtype=d).nbytes() for d in ("auto", "int8"))
    assert i8 / b16 == (64 + 4) / 128 <= 0.55
    with pytest.raises(ConfigError, match="unknown KV cache dtype 'fp8'"):
        KVCache(cfg, 1, 16, kv_dtype="fp8")
    with pytest.raises(ConfigError, match="'q4'"):
        Engine(random_model(cfg, 0), kv_cache_dtype="q4")


@pytest.mark.parametrize("h,kvh,d,s,cfg", [(16, 2, 64, 3001, PAPER), (9, 3, 64, 777, SPARSE), (4, 4, 80, 300, SPARSE)])
def test_sparse_decode_kernel_reads_int8_like_the_reference(tier, h, kvh, d, s, cfg):
    """sparse_decode_q8 on int8 rows and scales = select_one + attend_one on the rows dequantized to bf16."""
    ext = kernels.native()
    g = torch.Generator().manual_seed(d + s)
    q = torch.randn(2, h, 1, d, generator=g).bfloat16()
    (k8, ks), (v8, vs) = (kv8.quantize(torch.randn(2, kvh, s + 40, d, generator=g) * 3) for _ in range(2))
    k8, ks, v8, vs = k8[:, :, :s], ks[:, :, :s], v8[:, :, :s], vs[:, :, :s]  # slices of a longer cache
    k, v = kv8.dequantize(k8, ks, torch.bfloat16), kv8.dequantize(v8, vs, torch.bfloat16)
    conf = SparseConfig(**cfg)
    c1, c2 = (pad_kernels(c) for c in compress_both(k, conf))
    t = torch.tensor([s - 1, s - 120])
    k_sel = conf.n_select(-(-s // conf.block_size))
    idx_ref = select_one(q, t, c1, c2, conf, k_sel)
    ref = attend_one(q, k, v, t, idx_ref, conf.block_size).view(2, h, d)
    qc = q.view(2, h, d).contiguous()
    out, idx = ext.sparse_decode_q8(qc, qc, k8, v8, ks, vs, c1, c2, t, conf.kernel_size, conf.kernel_stride,
                                    conf.block_size, conf.init_blocks, conf.local_blocks, k_sel)
    assert torch.equal(idx, idx_ref)
    diff = (out.float() - ref.float()).abs().max()
    assert diff <= 4 * 2.0 ** -8 * ref.float().abs().max(), diff


def _decode(model, cfg, ids, n, steps, kv_dtype, native_prefill):
    """Prefill ids[:, :n] (2 rows; through the C++ stack when native_prefill, dense models only), then one token per
    row per step, row 1 five positions behind. -> (logits [2, steps, V], cache)."""
    cache = KVCache(cfg, 2, ids.shape[1], next(model.parameters()).dtype, kv_dtype=kv_dtype)
    out = []
    with torch.no_grad():
        stack = model.native
        model.native = stack if native_prefill else None
        model(ids[:, :n], cache=cache)
        model.native = stack
        for s in range(steps):
            pos = torch.tensor([[n + s], [n + s - 5]])
            out.append(model(torch.stack([ids[0, n + s], ids[1, n + s - 5]])[:, None], positions=pos, cache=cache)[:, -1])
    return torch.stack(out, 1), cache


@pytest.mark.parametrize("sparse", [None, SPARSE], ids=["dense", "sparse"])
def test_native_stack_on_int8_cache_agrees_with_python_layers(tier, sparse):
    """A bf16 model's decode steps (and, dense, its prefill chunks) through the C++ stack reading the int8 cache in
    place agree with the Python layers attending to the dequantized rows; the compressed keys the stack pools from
    int8 keys equal pooling the dequantized cache, bit for bit."""
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": sparse})
    torch.manual_seed(0)
    model = attach(MiniCPM4ForCausalLM(cfg).eval().to(torch.bfloat16))
    assert model.native is not None and model.native.int8_cache, "the C++ decode stack did not build"
    ids = torch.randint(0, 512, (2, 230))
    native, cache = _decode(model, cfg, ids, 100, 125, "int8", sparse is None)
    assert cache.k.dtype == torch.int8 and cache.k_scale.dtype == torch.float32
    stack, model.native = model.native, None
    python, _ = _decode(model, cfg, ids, 100, 125, "int8", False)
    model.native = stack
    scale = python.abs().mean()
    assert (native - python).abs().mean() < 0.02 * scale
    assert (native.argmax(-1) == python.argmax(-1)).float().mean() >= 0.9
    if sparse is not None:  # sparse from 64 keys on: every step ran the int8 sparse kernel and its pooling
        store, lens = cache.compressed, [225, 220]
        for layer in range(cfg.num_hidden_layers):
            assert store.covered[layer].tolist() == lens
            for b, n in enumerate(lens):
                keys = kv8.dequantize(cache.k[layer, b:b + 1, :, :n], cache.k_scale[layer, b:b + 1, :, :n],
                                      torch.bfloat16)
                for c, ref in zip(store.c, compress_both(keys, SparseConfig(**sparse))):
                    torch.testing.assert_close(c[layer, b:b + 1, :, :ref.shape[2]], ref, atol=0, rtol=0)


def test_default_model_int8_cache_is_about_as_accurate_as_bf16(smollm_gguf, real_text):
    """The default model, teacher-forced decode after a 280-token prefill, against the truth both approximate (fp32
    weights, fp32 cache). Stated tolerances (measured values in brackets):
    - fp32 weights, int8 cache vs fp32 cache: mean |logit difference| < 2.5% of mean |logit| (1.4%);
    - bf16 weights / int4 layers, C++ stack: the int8 cache's error vs the truth <= 1.5x the bf16 cache's
      (1.20x / 1.11x), and its argmax agrees with the truth's nearly as often (>= the bf16 cache's - 0.1)."""
    m32, tok = minicpm4.load(smollm_gguf, dtype="fp32")
    ids = torch.tensor([tok.encode(real_text)[:300], tok.encode(real_text)[400:700]])
    truth, _ = _decode(m32, m32.config, ids, 280, 20, "auto", False)
    fp32_int8, _ = _decode(m32, m32.config, ids, 280, 20, "int8", False)
    scale = truth.abs().mean()
    assert (fp32_int8 - truth).abs().mean() < 0.025 * scale
    for int4 in (False, True):
        m, _ = minicpm4.load(smollm_gguf, dtype="bf16", int4=int4)
        attach(m)
        assert m.native is not None and m.native.int8_cache
        i8, _ = _decode(m, m.config, ids, 280, 20, "int8", True)
        b16, _ = _decode(m, m.config, ids, 280, 20, "auto", True)
        err8, err16 = (i8 - truth).abs().mean(), (b16 - truth).abs().mean()
        assert err8 <= 1.5 * err16, (int4, err8, err16)
        agree = [(x.argmax(-1) == truth.argmax(-1)).float().mean() for x in (i8, b16)]
        assert agree[0] >= agree[1] - 0.1, (int4, agree)


@pytest.mark.parametrize("sparse, dtype", [(None, torch.bfloat16), (SPARSE, torch.bfloat16), (SPARSE, torch.float32)],
                         ids=["dense-bf16-native", "sparse-bf16-native", "sparse-fp32"])
def test_engine_int8_cache_prefix_cache_and_batching_are_exact(sparse, dtype):
    """Greedy tokens with an int8 cache: the same one at a time, batched (continuous batching, chunked prefill)
    and served from prefix-cache blocks, which hold the int8 rows and their scales."""
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": sparse})
    model = attach(random_model(cfg, 0).to(dtype))
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, 512, (200,), generator=g).tolist()
    prompts = [base[:150], base[:170] + [5, 6, 7] * 10, base[:150]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    plain = Engine(model, prefill_chunk=32, kv_cache_dtype="int8")
    want = [plain.generate([p], params)[0].token_ids for p in prompts]
    assert plain._cache.k.dtype == torch.int8
    cached = Engine(model, prefill_chunk=32, prefix_cache_gb=0.01, kv_cache_dtype="int8")
    got = [cached.generate([p], params)[0] for p in prompts]
    assert [x.token_ids for x in got] == want
    assert [x.cached_tokens for x in got] == [0, 128, 128]
    blk = next(iter(cached.prefix_cache.blocks.values()))
    assert [t.dtype for t in blk.kv] == [torch.int8, torch.int8, torch.float32, torch.float32]
    batched = Engine(model, prefill_chunk=32, max_slots=3, kv_cache_dtype="int8").generate(prompts, params)
    assert [x.token_ids for x in batched] == want


def test_compact_moves_scales_with_rows():
    """Speculative decoding's compact on an int8 cache: the kept slots' int8 rows and scales move together."""
    cfg = tiny()
    cache = KVCache(cfg, 1, 32, torch.bfloat16, kv_dtype="int8")
    g = torch.Generator().manual_seed(0)
    for buf in cache.buffers():
        buf.copy_(torch.randint(-100, 100, buf.shape, generator=g).to(buf.dtype))
    before = [b.clone() for b in cache.buffers()]
    keep = torch.tensor([0, 2, 5])
    cache.compact(10, keep)
    for b, old in zip(cache.buffers(), before):
        assert torch.equal(b[:, :, :, 10:13], old[:, :, :, 10 + keep])
        assert torch.equal(b[:, :, :, :10], old[:, :, :, :10])


def test_speculative_decoding_on_int8_cache_equals_plain_greedy():
    """EAGLE tree drafting on an int8 target cache: verification writes the tree's rows, compact() moves the
    accepted path's int8 rows and scales, and the tokens equal plain greedy decoding on an int8 cache."""
    from minicpm4.spec.decoder import SpeculativeDecoder
    from minicpm4.spec.eagle import EagleDraft
    from minicpm4.spec.tree import EagleDrafter
    target = random_model(tiny(), seed=0)
    prompt = torch.randint(3, 500, (17,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ref = Engine(target, kv_cache_dtype="int8").generate([prompt], params)[0].token_ids
    drafter = EagleDrafter(EagleDraft.for_target(target, seed=1), topk=4, num_iter=3, tree_size=9)
    spec = SpeculativeDecoder(target, drafter, kv_cache_dtype="int8")
    out = spec.generate([prompt], params)[0]
    assert spec._cache.k.dtype == torch.int8
    assert out.token_ids == ref
    assert any(1 < a < 4 for a in out.accepted[:-1])  # partial acceptance: compact moved slots
