"""The model against an independent, straightforward re-derivation of the MiniCPM4 forward pass.

The reference below is written from the paper/official-code formulas with explicit loops and no code
shared with minicpm4.model.decoder: per-head attention with an explicit softmax, LongRoPE from its definition.
"""

import copy
import math

import pytest
import torch
from model_util import random_model

from minicpm4.config import ModelConfig
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.model.kv_cache import KVCache


def longrope_config(**kw) -> ModelConfig:
    half = 8  # head_dim 16
    g = torch.Generator().manual_seed(1)
    long = (1 + 3 * torch.rand(half, generator=g)).tolist()
    short = (1 + 0.5 * torch.rand(half, generator=g)).tolist()
    base = dict(model_type="minicpm", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                rms_norm_eps=1e-6, scale_emb=12.0, scale_depth=1.4, dim_model_base=16.0, tie_word_embeddings=False,
                rope_scaling=dict(rope_type="longrope", long_factor=long, short_factor=short,
                                  original_max_position_embeddings=32))
    base.update(kw)
    return ModelConfig.from_dict(base)


def reference_forward(m: MiniCPM4ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """ids [T] -> logits [T, V], float64, straight from the formulas."""
    cfg = m.config
    sd = {k: v.double() for k, v in m.state_dict().items()}
    T, H, KV, D, L = ids.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    rs = cfg.rope_scaling
    inv = [1.0 / cfg.rope_theta ** (2 * i / D) for i in range(D // 2)]
    factors = rs["long_factor"] if cfg.max_position_embeddings > rs["original_max_position_embeddings"] else rs["short_factor"]
    mscale = math.sqrt(1 + math.log(cfg.max_position_embeddings / rs["original_max_position_embeddings"])
                       / math.log(rs["original_max_position_embeddings"]))

    def rope(x, t):  # x [D] at position t; rotate-half pairs (i, i + D/2)
        out = x.clone()
        for i in range(D // 2):
            ang = t * inv[i] / factors[i]
            c, s = math.cos(ang) * mscale, math.sin(ang) * mscale
            out[i] = x[i] * c - x[i + D // 2] * s
            out[i + D // 2] = x[i + D // 2] * c + x[i] * s
        return out

    h = sd["model.embed_tokens.weight"][ids] * cfg.scale_emb
    res = cfg.scale_depth / math.sqrt(L)
    for l in range(L):
        p = f"model.layers.{l}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(T, H, D)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(T, KV, D)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(T, KV, D)
        out = torch.zeros(T, H, D, dtype=torch.float64)
        for head in range(H):
            kvh = head // (H // KV)
            for t in range(T):
                qt = rope(q[t, head], t)
                scores = torch.stack([rope(k[j, kvh], j) @ qt / math.sqrt(D) for j in range(t + 1)])
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                out[t, head] = (w[:, None] * v[: t + 1, kvh]).sum(0)
        h = h + (out.reshape(T, H * D) @ sd[p + "self_attn.o_proj.weight"].T) * res
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate = x @ sd[p + "mlp.gate_proj.weight"].T
        mlp = ((gate * torch.sigmoid(gate)) * (x @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
        h = h + mlp * res
    h = rms(h, sd["model.norm.weight"]) / (cfg.hidden_size / cfg.dim_model_base)
    return h @ sd["lm_head.weight"].T


def test_tiny_minicpm4_matches_reference_past_original_length():
    cfg = longrope_config()
    assert cfg.rope_scaling and cfg.max_position_embeddings > cfg.rope_scaling["original_max_position_embeddings"]
    m = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(3))  # 40 > original 32
    with torch.no_grad():
        ours = m(ids[None])[0]
    ref = reference_forward(m, ids)
    assert ours.dtype == torch.float32
    diff = (ours.double() - ref).abs().max().item()
    print("max abs diff vs reference:", diff)
    assert diff < 1e-4


def test_short_factor_used_when_context_within_original_length():
    cfg = longrope_config(max_position_embeddings=32)  # = original: short factors, attention factor 1
    m = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = m(ids[None])[0]
    assert (ours.double() - reference_forward(m, ids)).abs().max().item() < 1e-4


def test_kv_cache_decode_equals_full_forward_at_every_position():
    cfg = longrope_config()
    m = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(cfg, 2, 64)
        parts = [m(ids[:, :7], cache=cache), m(ids[:, 7:20], positions=torch.arange(7, 20).expand(2, 13), cache=cache)]
        for t in range(20, 45):
            parts.append(m(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache))
    diff = (torch.cat(parts, 1) - full).abs().max().item()
    print("max abs diff cache vs full:", diff)
    assert diff < 1e-4


def test_rows_at_different_positions_share_one_decode_step():
    """Row 0 decodes at position 9 while row 1 is at 4: the position mask keeps them exact."""
    cfg = longrope_config()
    m = random_model(cfg)
    a, b = torch.randint(0, 97, (10,)), torch.randint(0, 97, (5,))
    with torch.no_grad():
        cache = KVCache(cfg, 2, 32)
        m(a[None, :9], cache=cache.rows(slice(0, 1)))
        m(b[None, :4], cache=cache.rows(slice(1, 2)))
        step = m(torch.stack([a[9:], b[4:]]), positions=torch.tensor([[9], [4]]), cache=cache)
        assert torch.allclose(step[0, -1], m(a[None])[0, -1], atol=1e-4)
        assert torch.allclose(step[1, -1], m(b[None])[0, -1], atol=1e-4)


def test_tied_embeddings_share_storage_and_bf16_logits_are_fp32():
    cfg = longrope_config(tie_word_embeddings=True)
    m = random_model(cfg).to(torch.bfloat16)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    out = m(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.float32 and out.shape == (1, 3, cfg.vocab_size)
    assert "lm_head.weight" in dict(m.named_parameters(remove_duplicate=False))


def test_cache_overflow_is_a_clear_error():
    cfg = longrope_config()
    m = random_model(cfg)
    with pytest.raises(ValueError, match="do not fit a cache of 8 slots"):
        m(torch.zeros(1, 10, dtype=torch.long), cache=KVCache(cfg, 1, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projections_give_the_same_logits(dtype):
    """qkv_proj / gate_up_proj hold the same weight rows side by side: prefill and cached decode agree."""
    cfg = longrope_config()
    m = random_model(cfg).to(dtype)
    fused = copy.deepcopy(m).fuse_projections()
    fused.native = None  # the same Python layers on fused weights (the C++ stack is held to the model in test_native)
    assert fused.fused and not m.fused
    assert not hasattr(fused.model.layers[0].self_attn, "q_proj") and not hasattr(fused.model.layers[0].mlp, "up_proj")
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = []
        for model in (m, fused):
            cache = KVCache(cfg, 2, 32, dtype=dtype)
            steps = [model(ids[:, :20], cache=cache)]
            steps += [model(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache) for t in range(20, 30)]
            outs.append(torch.cat(steps, 1))
    assert torch.equal(outs[0], outs[1])  # each output column is the same dot product as before
