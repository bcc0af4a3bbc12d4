"""InfLLM v2 sparse attention (minicpm4/sparse/attention.py) against independent references written here.

`reference_selection` re-derives the selection rule of minicpm4-model.md §3 with Python loops, per query
(compressed keys, scores, LSE over coarse kernels, GQA sum, max-pool, forced blocks, top-k, future -> dropped),
and imports nothing from minicpm4.sparse.attention*. Equal scores are frequent (neighbouring blocks share the max-pool's
boundary kernel); the spec leaves their order open and both sides give ties to the lower block index.
The sparse op must then equal dense attention under the mask of those blocks, outputs and gradients.
Selection-equality tests run in fp64 so that rounding cannot swap two nearly equal block scores; the others
run in fp32.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minicpm4.config import SPARSE_DEFAULTS, ModelConfig, tiny
from minicpm4.errors import ConfigError
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.model.kv_cache import KVCache
from minicpm4.model.native_stack import attach
from minicpm4.sparse.attention import (SparseConfig, block_scores, compress_keys, extend_compressed,
                                       infllmv2_attention, make_backend, select_blocks)
from minicpm4.sparse.select import compress_both

SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, init_blocks=1, topk=6, dense_len=-1)
REAL = dict(kernel_size=32, kernel_stride=16, block_size=64, window_size=128, init_blocks=1, topk=4, dense_len=-1)


# ---------- independent references ----------
def reference_kernels(k, cfg):
    """(C1, C2) for one row, k [KVH, S, D]: means of the complete kernels, stacked as [KVH, n, D]."""
    ks, st, (kvh, s, d) = cfg["kernel_size"], cfg["kernel_stride"], k.shape
    c1 = [k[:, st * j:st * j + ks].mean(1) for j in range(s) if st * j + ks <= s]
    c2 = [k[:, 4 * st * j:4 * st * j + 4 * ks].mean(1) for j in range(s) if 4 * st * j + 4 * ks <= s]
    return tuple(torch.stack(c, 1) if c else k.new_zeros(kvh, 0, d) for c in (c1, c2))


def reference_scores(q, kernels, s, t, cfg):
    """Literal stage 1 + 1b for one row and one query at position t: q [H, D] -> [KVH][n_blocks] block scores."""
    c1, c2 = kernels
    ks, st, blk = cfg["kernel_size"], cfg["kernel_stride"], cfg["block_size"]
    n1 = len([j for j in range(c1.shape[1]) if st * j + ks - 1 <= t])  # visible kernels form a prefix
    n2 = len([j for j in range(c2.shape[1]) if 4 * st * j + 4 * ks - 1 <= t])
    (h, d), kvh = q.shape, c1.shape[0]
    g = h // kvh
    n_blocks, r, qb = math.ceil(s / blk), blk // st, t // blk
    out = []
    for grp in range(kvh):
        score = [0.0] * c1.shape[1]  # invisible kernels (and all, when no coarse kernel is visible) score 0
        if n2:
            heads = q[grp * g:(grp + 1) * g]  # [G, D]
            lse = torch.logsumexp(heads @ c2[grp, :n2].T / math.sqrt(d), dim=1, keepdim=True)  # [G, 1]
            p = torch.exp(heads @ c1[grp, :n1].T / math.sqrt(d) - lse).sum(0)  # summed over the group's heads
            score[:n1] = p.tolist()
        blocks = []
        for b in range(n_blocks):
            js = [j for j in range(r * b - 1, r * b + r) if 0 <= j < len(score)]
            value = max(score[j] for j in js) if js else -math.inf
            if b < cfg["init_blocks"] or qb - cfg["window_size"] // blk <= b <= qb:
                value = math.inf
            blocks.append(value)
        out.append(blocks)
    return out


def reference_selection(q, k, kv_lens, positions, cfg):
    """Selected block sets: list [B][KVH][T] of sorted lists. q [B, H, T, D], k [B, KVH, S, D]."""
    result = []
    for b in range(q.shape[0]):
        s = int(kv_lens[b])
        kernels = reference_kernels(k[b, :, :s], cfg)
        n_blocks = math.ceil(s / cfg["block_size"])
        top = min(cfg["topk"] + cfg["window_size"] // cfg["block_size"], n_blocks)
        rows = [[] for _ in range(k.shape[1])]
        for i, t in enumerate(positions[b].tolist()):
            t = min(t, s - 1)
            for grp, scores in enumerate(reference_scores(q[b, :, i], kernels, s, t, cfg)):
                order = sorted(range(n_blocks), key=lambda n: (-scores[n], n))[:top]  # ties: lower block first
                rows[grp].append(sorted(n for n in order if n <= t // cfg["block_size"]))
        result.append(rows)
    return result


def masked_attention(q, k, v, mask):
    """Plain softmax attention; mask [B, KVH, T, S] bool, shared by the G query heads of a KV head."""
    g = q.shape[1] // k.shape[1]
    k, v, mask = (x.repeat_interleave(g, dim=1) for x in (k, v, mask))
    att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return att.masked_fill(~mask, -math.inf).softmax(-1) @ v


def selection_mask(sel, kv_lens, positions, s, block):
    """[B, KVH, T, S]: key in a selected block, at or before the query, inside the row."""
    b_, kvh, t = len(sel), len(sel[0]), len(sel[0][0])
    mask = torch.zeros(b_, kvh, t, s, dtype=torch.bool)
    for b in range(b_):
        for grp in range(kvh):
            for i in range(t):
                last = min(int(positions[b, i]), int(kv_lens[b]) - 1)
                for n in sel[b][grp][i]:
                    mask[b, grp, i, n * block:min((n + 1) * block, last + 1)] = True
    return mask


def as_sets(topk_idx):
    return [[[sorted(x for x in row if x >= 0) for row in grp.tolist()] for grp in b] for b in topk_idx]


def make_qkv(b, h, kvh, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, t, d, generator=g, dtype=dtype) for n in (h, kvh, kvh))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def grads(out, inputs, seed=1):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, upstream)


def assert_close(a, b, atol, name):
    diff = (a - b).abs().max().item()
    print(f"{name}: max |diff| = {diff:.3g}")
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=f"{name}: max |diff| {diff}")


# ---------- tests ----------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("g,d,t,cfg", [(8, 64, 777, SMALL), (16, 128, 1001, REAL)])
def test_topk_covering_every_block_equals_dense_causal(g, d, t, cfg):
    q, k, v = make_qkv(1, 2 * g, 2, t, d, torch.float32)
    out = infllmv2_attention(q, k, v, **{**cfg, "topk": t})
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(out, ref, 1e-5, "output")
    for name, a, b in zip("qkv", grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(a, b, 1e-5, f"d{name}")


@pytest.mark.parametrize("g,d,t,cfg", [
    (8, 64, 777, SMALL),
    (16, 128, 1001, SMALL),
    (8, 64, 1000, REAL),
    (16, 64, 613, dict(SMALL, kernel_size=16, block_size=32, window_size=64, init_blocks=2, topk=5)),
])
def test_small_topk_matches_bruteforce_selection(g, d, t, cfg):
    q, k, v = make_qkv(1, 2 * g, 2, t, d, torch.float64, seed=t)
    kv_lens, positions = torch.tensor([t]), torch.arange(t)[None]
    sel = reference_selection(q.detach(), k.detach(), kv_lens, positions, cfg)
    idx = select_blocks(q, k, positions, SparseConfig(**cfg))
    top = min(cfg["topk"] + cfg["window_size"] // cfg["block_size"], math.ceil(t / cfg["block_size"]))
    expected = torch.tensor([[[row + [-1] * (top - len(row)) for row in grp] for grp in sel[0]]], dtype=torch.int32)
    assert torch.equal(idx, expected)  # ascending block ids, then -1 for the slots of future blocks
    local = cfg["window_size"] // cfg["block_size"]
    assert any(cfg["init_blocks"] <= n < s[-1] - local for s in sel[0][0] for n in s), \
        "no query selected a block outside its init blocks and window: the test would be trivial"
    ref = masked_attention(q, k, v, selection_mask(sel, kv_lens, positions, t, cfg["block_size"]))
    out = infllmv2_attention(q, k, v, positions, **cfg)
    assert_close(out, ref, 1e-10, "output")
    for name, a, b in zip("qkv", grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(a, b, 1e-10, f"d{name}")


def test_block_scores_match_literal_rule():
    cfg = SMALL
    q, k, _ = make_qkv(1, 16, 2, 301, 64, torch.float64)
    scores = block_scores(q, k, None, cfg)
    kernels = reference_kernels(k[0].detach(), cfg)
    ref = torch.tensor([reference_scores(q[0, :, i].detach(), kernels, 301, i, cfg) for i in range(301)],
                       dtype=torch.float64).permute(1, 0, 2)[None]
    torch.testing.assert_close(scores, ref, atol=1e-12, rtol=1e-12)


def test_batch_rows_of_different_lengths():
    cfg, lens, d = SMALL, (777, 1001), 64
    n0, t = lens[0], max(lens)
    q, k, v = make_qkv(2, 16, 2, t, d, torch.float64, seed=5)
    with torch.no_grad():  # keys past row 0's length are garbage that must never be attended
        k[0, :, n0:] = 1e3
        v[0, :, n0:] = 1e3
    kv_lens, positions = torch.tensor(lens), torch.arange(t).repeat(2, 1)
    sel = reference_selection(q.detach(), k.detach(), kv_lens, positions, cfg)
    assert as_sets(select_blocks(q, k, positions, cfg, kv_lens=kv_lens)) == sel
    ref = masked_attention(q, k, v, selection_mask(sel, kv_lens, positions, t, cfg["block_size"]))
    real = torch.ones(2, 1, t, 1, dtype=torch.float64)  # gradients of the real (non-padding) queries only
    real[0, :, n0:] = 0
    ref_grads = grads(ref * real, (q, k, v))
    padded = positions.clone()
    padded[0, n0:] = n0 - 1  # padding queries repeat row 0's last position: kv_lens = positions.max + 1
    for name, out in [("explicit kv_lens", infllmv2_attention(q, k, v, positions, kv_lens=kv_lens, **cfg)),
                      ("kv_lens from positions", infllmv2_attention(q, k, v, padded, **cfg))]:
        assert_close(out[0, :, :n0], ref[0, :, :n0], 1e-10, f"{name}, row 0")
        assert_close(out[1], ref[1], 1e-10, f"{name}, row 1")
        out_grads = grads(out * real, (q, k, v))
        for g, a, b in zip("qkv", out_grads, ref_grads):
            assert_close(a, b, 1e-10, f"{name}, d{g}")
        assert out_grads[1][0, :, n0:].abs().max() == 0  # no gradient reaches the garbage keys


def test_decode_equals_prefill():
    cfg, t = SMALL, 1001
    q, k, v = make_qkv(2, 16, 2, t, 64, torch.float32, seed=3)
    with torch.no_grad():
        full = infllmv2_attention(q, k, v, **cfg)
        c1, c2 = compress_both(k, SparseConfig(**cfg))
        for p in (700, 998, 999, 1000):
            step = infllmv2_attention(q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1], **cfg)
            assert_close(step[:, :, 0], full[:, :, p], 1e-5, f"decode at {p}")
            # compressed keys of the whole cache: kernels not yet complete at p are invisible to it
            cached = infllmv2_attention(q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1], compressed=(c1, c2), **cfg)
            assert_close(cached, step, 1e-6, f"decode with cached kernels at {p}")
        grown = None  # compressed keys kept up to date one decode step at a time
        for p in range(100, t):
            grown = extend_compressed(grown, k[:, :, :p + 1], SparseConfig(**cfg))
        for a, b in zip(grown, compress_both(k, SparseConfig(**cfg))):
            assert_close(a, b, 1e-6, "incrementally compressed keys")
        chunk = infllmv2_attention(q[:, :, 960:], k, v, **cfg)  # a short chunk of queries after a cached prefix
        assert_close(chunk, full[:, :, 960:], 1e-5, "chunked prefill")


def test_below_dense_len_is_sdpa_causal():
    q, k, v = make_qkv(1, 16, 2, 777, 64, torch.float32)
    out = infllmv2_attention(q, k, v, **{**SMALL, "dense_len": 778})
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    step = infllmv2_attention(q[:, :, -1:], k, v, **{**SMALL, "dense_len": 778})
    assert_close(step, F.scaled_dot_product_attention(q[:, :, -1:], k, v, enable_gqa=True), 1e-6, "decode")
    sparse = infllmv2_attention(q, k, v, **{**SMALL, "dense_len": 777})  # kv_len 777 is not below 777
    assert not torch.allclose(sparse, out, atol=1e-3)


def test_use_nope_selects_with_pre_rope_inputs():
    cfg = dict(SMALL, use_nope=True)
    q, k, v = make_qkv(1, 16, 2, 600, 64, torch.float64)
    q_nope, k_nope, _ = make_qkv(1, 16, 2, 600, 64, torch.float64, seed=9)
    out = infllmv2_attention(q, k, v, q_nope=q_nope, k_nope=k_nope, **cfg)
    idx = select_blocks(q_nope, k_nope, None, cfg)
    assert torch.equal(out, infllmv2_attention(q, k, v, topk_idx=idx, **cfg))
    assert not torch.equal(idx, select_blocks(q, k, None, cfg))
    with pytest.raises(ValueError, match="use_nope"):
        infllmv2_attention(q, k, v, **cfg)


def test_model_backend_seam():
    """Through the model's backend seam: every block selected = the dense model; prefill + decode with a cache."""
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny()).eval()
    ids = torch.randint(0, 512, (2, 300))
    with torch.no_grad():
        dense = model(ids)
        model.set_attention_backend(make_backend(dict(SMALL, topk=1000)))
        torch.testing.assert_close(model(ids), dense, atol=1e-4, rtol=0)
        model.set_attention_backend(make_backend(SMALL))
        sparse = model(ids)
        cache = KVCache(model.config, 2, 320)
        model(ids[:, :299], cache=cache)
        step = model(ids[:, 299:], positions=torch.full((2, 1), 299), cache=cache)
    torch.testing.assert_close(step[:, 0], sparse[:, 299], atol=1e-4, rtol=0)
    assert (sparse - dense).abs().max() > 1e-3  # the small top-k does change the result


def test_compress_keys_means_complete_kernels():
    k = torch.randn(2, 3, 100, 8, dtype=torch.float64)
    c = compress_keys(k, 32, 16)
    assert c.shape == (2, 3, 5, 8)  # kernels start at 0, 16, 32, 48, 64; the one at 80 is incomplete
    for j in range(5):
        torch.testing.assert_close(c[:, :, j], k[:, :, 16 * j:16 * j + 32].mean(2))
    assert compress_keys(k[:, :, :31], 32, 16).shape == (2, 3, 0, 8)


def test_config_defaults_and_from_dict():
    assert SparseConfig() == SparseConfig.from_dict(SPARSE_DEFAULTS)
    model = ModelConfig(sparse_config={"topk": 32})
    assert SparseConfig.from_dict(model.sparse_config).topk == 32


@pytest.mark.parametrize("bad,message", [
    ({"block_size": 60}, "block_size .* multiple of kernel_stride"),
    ({"window_size": 100}, "window_size .* multiple of block_size"),
    ({"kernel_size": 24}, "kernel_size .* multiple of kernel_stride"),
    ({"kernel_stride": 0}, "kernel_stride must be a positive integer"),
    ({"block_size": -64}, "block_size must be a positive integer"),
    ({"topk": -1}, "topk must be a non-negative integer"),
    ({"dense_len": -2}, "dense_len must be an integer >= -1"),
    ({"use_nope": "yes"}, "use_nope must be true or false"),
    ({"topk": 0, "window_size": 0}, "topk \\+ window_size/block_size must be at least 1"),
    ({"topk_blocks": 8}, "unknown sparse_config key.*'topk_blocks'"),
])
def test_invalid_configs_raise(bad, message):
    with pytest.raises(ConfigError, match=message):
        SparseConfig.from_dict({**SPARSE_DEFAULTS, **bad})


def test_sparse_config_in_model_config_switches_mid_generation():
    """sparse_config in config.json turns the backend on, and the dense/sparse switch is decided per call from the
    key length, as in the official code: token-by-token decode runs dense while the cache is below dense_len (equal
    to the dense model) and sparse from then on (equal to the sparse full forward at those positions)."""
    sparse = dict(SMALL, dense_len=200)
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": sparse})
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg).eval()
    dense = MiniCPM4ForCausalLM(tiny()).eval()
    dense.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (1, 300))
    with torch.no_grad():
        sparse_full, dense_full = model(ids), dense(ids)
        cache = KVCache(cfg, 1, 320)
        steps = [model(ids[:, :150], cache=cache)]
        steps += [model(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache) for t in range(150, 300)]
    decoded = torch.cat(steps, 1)
    torch.testing.assert_close(decoded[:, :199], dense_full[:, :199], atol=1e-4, rtol=0)  # keys < dense_len
    torch.testing.assert_close(decoded[:, 199:], sparse_full[:, 199:], atol=1e-4, rtol=0)  # keys >= dense_len
    assert (sparse_full[:, 199:] - dense_full[:, 199:]).abs().max() > 1e-3  # the selection does act there


def test_bad_sparse_config_in_model_config_is_a_config_error():
    with pytest.raises(ConfigError, match="window_size .* multiple of block_size"):
        ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": {"window_size": 100}})


@pytest.mark.parametrize("fused", [False, True])
def test_model_use_nope_selects_on_pre_rope_and_decodes_through_the_cache(fused):
    """use_nope in the model: every layer's attention equals infllmv2_attention given the pre-RoPE q/k computed
    here from the layer's own projections; prefill + token-by-token decode through the cache (pre-RoPE key cache
    and kernels pooled from it) equals the one-pass forward; and the pre-RoPE selection differs from the RoPE one."""
    sparse = dict(SMALL, use_nope=True, dense_len=-1)
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": sparse})
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg).eval()
    rope = MiniCPM4ForCausalLM(ModelConfig.from_dict({**cfg.to_dict(), "sparse_config": dict(sparse, use_nope=False)}))
    rope.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (1, 260))
    seen = []

    def spy(module, args, out):  # check layer 0's attention against the op fed independently computed inputs
        x, cos, sin = args[0], args[1], args[2]
        b, t, _ = x.shape
        qn = module.q_proj(x).view(b, t, 8, 16).transpose(1, 2)
        kn = module.k_proj(x).view(b, t, 2, 16).transpose(1, 2)
        from minicpm4.model.decoder import apply_rotary
        q = apply_rotary(qn.transpose(1, 2), cos, sin).transpose(1, 2)
        k = apply_rotary(kn.transpose(1, 2), cos, sin).transpose(1, 2)
        v = module.v_proj(x).view(b, t, 2, 16).transpose(1, 2)
        ref = infllmv2_attention(q, k, v, q_nope=qn, k_nope=kn, **sparse)
        seen.append((out, module.o_proj(ref.transpose(1, 2).reshape(b, t, 128))))
    with torch.no_grad():
        hook = model.model.layers[0].self_attn.register_forward_hook(spy)
        full = model(ids)
        hook.remove()
        assert_close(seen[0][0], seen[0][1], 1e-5, "layer 0 attention vs the op on pre-RoPE q/k")
        assert (full - rope(ids)).abs().max() > 1e-3  # pre-RoPE selection is not the RoPE one
        if fused:
            attach(model)
        cache = KVCache(cfg, 1, 288)
        steps = [model(ids[:, :150], cache=cache)]
        steps += [model(ids[:, p:p + 1], positions=torch.tensor([[p]]), cache=cache) for p in range(150, 260)]
    assert_close(torch.cat(steps, 1), full, 1e-4, "cached decode with use_nope")
    with pytest.raises(ValueError, match="use_nope with a KV cache"):  # a cache without the pre-RoPE keys
        model(ids[:, :10], cache=KVCache(tiny(), 1, 16))


def test_ragged_decode_rows_equal_the_general_path():
    """One query per row at different positions (an engine's batched decode): sparse/decode.py's path equals the
    chunked general path (taken with gradients on), selection and output."""
    cfg, d = SMALL, 64
    q, k, v = make_qkv(3, 16, 2, 1, d, torch.float64, seed=11)
    k, v = (torch.randn(3, 2, 900, d, dtype=torch.float64) for _ in range(2))
    positions = torch.tensor([[899], [517], [40]])  # rows hold 900, 518 and 41 keys; the rest is garbage
    with torch.no_grad():
        fast = infllmv2_attention(q, k, v, positions, **cfg)
        idx = select_blocks(q, k, positions, cfg)
    general = infllmv2_attention(q, k.requires_grad_(), v, positions, **cfg)  # grad on: the chunked path
    assert_close(fast, general.detach(), 1e-12, "ragged decode")
    sel = reference_selection(q, k.detach(), positions[:, 0] + 1, positions, cfg)
    assert as_sets(idx) == sel


def test_compressed_key_cache_follows_writes():
    """KVCache.compressed: pooled incrementally, and a rewrite (a slot reused for a new request) drops the kernels
    that reach the rewritten keys, so the cached kernels always equal pooling the current keys."""
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": SMALL})
    scfg = SparseConfig(**SMALL)
    cache = KVCache(cfg, 2, 512)
    row = cache.rows(slice(1, 2))  # a view, as the engine uses: state is shared with `cache`
    kvh, d = cfg.num_key_value_heads, cfg.head_dim

    def write(p0, n, seed):
        kv = torch.randn(1, kvh, n, d, generator=torch.Generator().manual_seed(seed))
        return row.update(0, torch.arange(p0, p0 + n)[None], kv, kv, p0, p0 + n)[0]

    def check(k, n):
        got = row.compressed.kernels(0, k, [n])
        for c, ref in zip(got, compress_both(k[:, :, :n], scfg)):
            assert_close(c[:, :, :ref.shape[2]], ref, 1e-6, f"kernels of {n} keys")
        assert int(cache.compressed.covered[0, 1]) == n and int(cache.compressed.covered[0, 0]) == 0

    k = write(0, 150, 0)
    check(k, 150)
    for p in range(150, 170):  # decode steps: one key each
        k = write(p, 1, p)
        check(k, p + 1)
    k = write(0, 97, 99)  # a new request in the same row: its prompt replaces the old keys from 0
    check(k, 97)
    k = write(60, 30, 98)  # a rewrite from the middle
    check(k, 90)


def test_engine_with_sparse_cache_equals_full_recompute():
    """Continuous batching through the compressed-key cache (chunked prefill, requests joining mid-flight, a slot
    reused by a later request, ragged batched decode) gives the greedy tokens of recomputing the whole sequence
    without a cache at every step. Prompts are past dense_len, so both sides are sparse at every position."""
    from minicpm4.engine.engine import Engine
    from minicpm4.engine.sampling import SamplingParams
    sparse = dict(SMALL, window_size=16, topk=5, dense_len=64)  # 6 blocks of 16 keys, 3 of them picked by score
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": sparse})
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg).eval()
    with torch.no_grad():  # peaky, dominant attention: otherwise the random model hardly notices the selection
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 6
            layer.self_attn.k_proj.weight *= 6
            layer.self_attn.o_proj.weight *= 20
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (150, 231, 97)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=0)
    expected, expected_lp = [], []
    with torch.no_grad():
        for ids in prompts:
            ids, lps = list(ids), []
            for _ in range(8):
                logits = model(torch.tensor([ids]))[0, -1]
                ids.append(int(logits.argmax()))
                lps.append(float(logits.log_softmax(-1)[ids[-1]]))
            expected.append(ids[-8:])
            expected_lp.append(lps)
    eng = Engine(model, prefill_chunk=64, max_slots=2)
    first = eng.add_request(prompts[0], params)
    for _ in range(4):
        eng.step()
    later = [eng.add_request(p, params) for p in prompts[1:]]
    while eng.has_work:
        eng.step()
    assert [r.out.token_ids for r in [first, *later]] == expected
    got_lp = torch.tensor([[lp for lp, _ in r.out.logprobs] for r in [first, *later]])
    assert_close(got_lp, torch.tensor(expected_lp), 1e-4, "log-probabilities")
    assert eng._cache.compressed is not None
