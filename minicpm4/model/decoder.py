"""The MiniCPM4 decoder in plain PyTorch, computing what the official modeling_minicpm.py computes.

    h0      = embed_tokens(ids) * scale_emb
    h      += Attn(RMSNorm(h)) * scale_depth/sqrt(L)          (per layer, pre-norm)
    h      += MLP(RMSNorm(h))  * scale_depth/sqrt(L)
    logits  = lm_head(RMSNorm(h) / (hidden_size/dim_model_base)).float()

RMSNorm runs in fp32 and casts back to the input dtype before the weight multiply; rotary embeddings
(rotate-half, optional LongRoPE factors and attention factor) are applied in fp32. Module and
parameter names equal the Hugging Face ones, so official safetensors load without renaming.
A Llama checkpoint is the case where every multiplier above is 1 (see config.py).

Attention goes through a backend seam: `Attention.backend(q, k, v, ctx)` with ctx an AttnContext.
The dense backend is SDPA; InfLLM v2 sparse attention plugs in as another backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minicpm4.config import ModelConfig
from minicpm4.model.kv_cache import KVCache
from minicpm4.sparse.attention import make_backend as sparse_backend


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, rounded once to x's dtype, as the official code does. Computed as
        # LayerNorm of [x, -x]: that vector has mean exactly 0 and variance mean(x^2), so its first half is the
        # RMS-normalised x. LayerNorm is one native CPU kernel (fp32 inside for bf16), while F.rms_norm runs as
        # ~8 small ops, and a decode step runs 2L+1 norms. The two differ only in
        # fp32 summation order (1 bf16 ulp on ~3 of 10^6 values of a random test).
        h = x.shape[-1]
        return self.weight * F.layer_norm(torch.cat((x, -x), dim=-1), (2 * h,), eps=self.eps)[..., :h]


class RotaryEmbedding(nn.Module):
    """cos and signed sin [B, T, 1, head_dim] (fp32, broadcast over heads) for absolute positions.

    The sin returned is negated in its first half (see apply_rotary), so rotation needs no negation per layer.

    LongRoPE (MiniCPMLongRoPE): freqs[t, i] = t * (1/ext[i]) * inv_freq[i], where ext is long_factor when the
    cached length (max_position_embeddings, or the sequence if longer) exceeds the original length, else
    short_factor; cos and sin are multiplied by sqrt(1 + ln(max_pos/orig)/ln(orig)).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_pos = config.max_position_embeddings
        rs = config.rope_scaling
        self.longrope = rs is not None
        if self.longrope:
            self.orig_max = rs["original_max_position_embeddings"]
            self.register_buffer("long_factor", torch.tensor(rs["long_factor"], dtype=torch.float32), persistent=False)
            self.register_buffer("short_factor", torch.tensor(rs["short_factor"], dtype=torch.float32), persistent=False)
            ratio = self.max_pos / self.orig_max
            self.attn_factor = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(self.orig_max))

    def forward(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = positions.float()[..., None]  # [B, T, 1]
        if self.longrope:
            ext = self.long_factor if max(self.max_pos, seq_len) > self.orig_max else self.short_factor
            freqs = t * (1.0 / ext) * self.inv_freq
        else:
            freqs = t * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.longrope and self.attn_factor != 1.0:
            cos, sin = cos * self.attn_factor, sin * self.attn_factor
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos[:, :, None], sin[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + cat(-x2, x1) * sin, computed in fp32, returned in x's dtype.

    x [B, T, heads, D]; cos, signed_sin [B, T, 1, D] fp32 with signed_sin = cat(-sin1, sin2). Since
    cat(-x2, x1) * sin = roll(x, D/2) * signed_sin, this is 4 ops instead of 9 (a decode step is op-bound);
    bf16 x times fp32 cos promotes to fp32, so x is never rounded before the rotation.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin).to(x.dtype)


@dataclass
class AttnContext:
    """What an attention backend needs besides q, k, v; built once per forward, shared by all layers."""
    positions: torch.Tensor  # [B, T] absolute positions of the queries
    kv_len: int  # keys that exist (max position + 1): attention reads cache slots [0, kv_len)
    mask: torch.Tensor | None  # [B, 1, T, kv_len] bool (True = attend), or None: causal / every key visible
    is_causal: bool  # queries and keys start at 0 and are the same tokens: plain causal
    cache: KVCache | None = None
    _bias: torch.Tensor | None = None

    def decode_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask as an additive 0/-inf tensor in `dtype`, built once per forward for all layers (SDPA
        would otherwise convert a bool mask in every layer)."""
        if self.mask is not None and (self._bias is None or self._bias.dtype != dtype):
            self._bias = torch.zeros(self.mask.shape, dtype=dtype).masked_fill_(~self.mask, float("-inf"))
        return self._bias if self.mask is not None else None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, layer: int) -> torch.Tensor:
    """Causal softmax attention. q [B, H, T, D], k/v [B, KVH, S, D] -> [B, H, T, D]; GQA by head groups."""
    if q.shape[2] == 1:
        return decode_attention(q, k, v, ctx.decode_bias(q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One query per row: the G query heads of a group become G queries against their shared K/V head, so
    GQA needs no repeated keys and SDPA's CPU kernel (fp32 accumulation) runs a few large heads instead of
    many one-row ones (fewer, larger calls than a matmul/softmax/matmul chain or per-head SDPA).

    q [B, H, 1, D], k/v [B, KVH, S, D], bias [B, 1, 1, S] additive 0/-inf in q's dtype, or None -> [B, H, 1, D]
    """
    b, h, _, d = q.shape
    kvh = k.shape[1]
    out = F.scaled_dot_product_attention(q.view(b, kvh, h // kvh, d), k, v, attn_mask=bias)  # [B, KVH, G, D]
    return out.view(b, h, 1, d)


def run_layers(native, layers: nn.ModuleList, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext,
               contiguous_from: int | None, slots: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """h through decoder `layers`: one C++ call when their stack (`native`, a native_stack.NativeDecoder or None)
    takes this pass, the Python layers otherwise. slots [B, T]: the tokens' cache slots (default: positions);
    causal: each token sees the slots up to its own (no mask tensor for the C++ stack)."""
    if native is not None and native.usable(h, ctx):
        return native(h, cos, sin, ctx, slots, causal)
    for layer in layers:
        h = layer(h, cos, sin, ctx, contiguous_from)
    return h


def cat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One linear layer whose output is the outputs of `layers` (all reading the same input) side by side,
    or None where their kind or layout cannot be joined. Exact: each output column is still the dot product
    of the input with that column's own weight row."""
    first = layers[0]
    if any(type(m) is not type(first) for m in layers):
        return None
    if not isinstance(first, nn.Linear):
        try:
            return type(first).cat(layers)  # Int4Linear, Int8Linear
        except ValueError:  # int4 row blocks that do not line up (see Int4Linear.cat)
            return None
    w = torch.cat([m.weight.detach() for m in layers])
    out = nn.Linear(first.in_features, w.shape[0], bias=first.bias is not None, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    if first.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]), requires_grad=False)
    return out


AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttnContext, int], torch.Tensor]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.layer_idx = layer_idx
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=bias)
        self.qkv_proj: nn.Module | None = None  # set by fuse(): q, k, v rows in one weight
        self.backend: AttentionBackend = dense_attention

    def fuse(self) -> None:
        if (fused := cat_linears([self.q_proj, self.k_proj, self.v_proj])) is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext,
                contiguous_from: int | None) -> torch.Tensor:
        b, t, _ = x.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_proj is not None:  # q and k rotate together: half the small ops of a decode step
            qkv = self.qkv_proj(x).view(b, t, nh + 2 * nkv, d)
            q_raw, k_raw = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv]  # pre-RoPE views
            qk = apply_rotary(qkv[:, :, :nh + nkv], cos, sin)
            q, k, v = qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv:]
        else:
            q_raw, k_raw = self.q_proj(x).view(b, t, nh, d), self.k_proj(x).view(b, t, nkv, d)
            q = apply_rotary(q_raw, cos, sin)  # [B, T, H, D]
            k = apply_rotary(k_raw, cos, sin)  # [B, T, KVH, D]
            v = self.v_proj(x).view(b, t, nkv, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, ctx.positions, k, v, contiguous_from, ctx.kv_len)
        if getattr(self.backend, "uses_nope", False):  # InfLLM v2 use_nope: blocks selected by pre-RoPE q and k
            out = self.backend(q, k, v, ctx, self.layer_idx, nope=(q_raw.transpose(1, 2), k_raw.transpose(1, 2)))
        else:
            out = self.backend(q, k, v, ctx, self.layer_idx)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by fuse(): gate and up rows in one weight

    def fuse(self) -> None:
        if (fused := cat_linears([self.gate_proj, self.up_proj])) is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext,
                contiguous_from: int | None) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), cos, sin, ctx, contiguous_from)
        h = h + (a if self.residual_scale == 1.0 else a * self.residual_scale)
        m = self.mlp(self.post_attention_layernorm(h))
        return h + (m if self.residual_scale == 1.0 else m * self.residual_scale)


class MiniCPM4Model(nn.Module):
    """The `model.` prefix of the HF checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class MiniCPM4ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MiniCPM4Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # the C++ decode stack (model/native_stack.NativeDecoder), attached from outside by native_stack.attach;
        # this module never imports it: the Python layers below are its reference
        self.native = None
        if config.sparse_config is not None:  # InfLLM v2 (dense below sparse_config.dense_len keys)
            self.set_attention_backend(sparse_backend(config.sparse_config))

    def fuse_projections(self) -> "MiniCPM4ForCausalLM":
        """Inference only: q/k/v become one `qkv_proj` and gate/up one `gate_up_proj` in every layer.

        Fewer, larger matmuls and one rotary call for q and k together: a batch-1 decode step on CPU is
        dominated by per-op overhead, and this removes about a third of its ops. Outputs are unchanged.
        The fused model no longer has the HF parameter names, so it cannot be trained or saved; load a
        fresh copy for that. Idempotent. For the C++ decode stack on top, see model/native_stack.attach.
        """
        for layer in self.model.layers:
            if layer.self_attn.qkv_proj is None:
                layer.self_attn.fuse()
            if layer.mlp.gate_up_proj is None:
                layer.mlp.fuse()
        return self

    @property
    def fused(self) -> bool:
        return any(layer.self_attn.qkv_proj is not None or layer.mlp.gate_up_proj is not None
                   for layer in self.model.layers)

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        if backend is not dense_attention or (self.native is not None and self.native.sparse is not None):
            self.native = None  # the C++ stack is built for the backend fuse_projections() found
        for layer in self.model.layers:
            layer.self_attn.backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0,
                segments: torch.Tensor | None = None, hidden_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] in fp32 (only the last `logits_to_keep` positions if > 0).

        positions [B, T]: absolute positions (default 0..T-1). With a cache, keys and values are written at
        those positions and queries attend to every cached position <= their own.
        segments [B, T] (training on packed rows, no cache): the document index of each token, contiguous runs;
        a token attends only to earlier tokens of its own document and positions restart at 0 per document, so
        each document is computed as if it were alone.
        hidden_only: return what lm_head would read, [B, T, H] (final norm, divided by logit_scale), for a fused
        head + loss in training (minicpm4.train.linear_cross_entropy).
        """
        b, t = input_ids.shape
        if segments is not None:
            if cache is not None:
                raise ValueError("segments (packed documents) are for cache-free training forwards")
            ctx, contiguous_from = self.packed_context(segments), None
            positions = ctx.positions
        else:
            if positions is None:
                positions = torch.arange(t, device=input_ids.device).expand(b, t)
            ctx, contiguous_from = self._attn_context(positions, cache)
        cfg = self.config
        h = self.model.embed_tokens(input_ids)
        if cfg.scale_emb != 1.0:
            h = h * cfg.scale_emb
        cos, sin = self.model.rotary_emb(positions, ctx.kv_len)
        h = run_layers(self.native, self.model.layers, h, cos, sin, ctx, contiguous_from,
                       causal=t > 1 and contiguous_from is not None)  # aligned prefill chunks: causal by slot
        if logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        h = self.model.norm(h)
        if cfg.logit_scale != 1.0:
            h = h / cfg.logit_scale
        return h if hidden_only else self.lm_head(h).float()

    @staticmethod
    def packed_context(segments: torch.Tensor) -> AttnContext:
        """Block-diagonal causal mask [B, 1, T, T] and per-document positions for packed rows.

        A document starts where segments[:, i] != segments[:, i-1]; its tokens get positions i - start.
        """
        t = segments.shape[1]
        idx = torch.arange(t, device=segments.device)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        positions = idx - torch.where(starts, idx, 0).cummax(dim=1).values  # [B, T]
        mask = (segments[:, :, None] == segments[:, None, :]) & (idx[:, None] >= idx[None, :])
        return AttnContext(positions, t, mask[:, None], False)

    def forward_masked(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                       mask: torch.Tensor, logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """T new tokens with an explicit attention mask (tree verification, speculative drafting).

        input_ids, positions [B, T]; the tokens' keys and values go to cache slots start..start+T-1 whatever
        their positions (several tree nodes share a position), positions drive only the rotary embedding.
        mask [B, T, start+T] bool: which slots each new token attends to (True = attend).
        Returns logits [B, T, V] fp32 (only the last `logits_to_keep` tokens' if > 0) and the final-normed hidden
        states [B, T, hidden] (before the logit scale) of every token, the features an EAGLE draft reads.
        """
        b, t = input_ids.shape
        if start + t > cache.max_len:
            raise ValueError(f"slots up to {start + t - 1} do not fit a cache of {cache.max_len} slots")
        ctx = AttnContext(positions, start + t, mask[:, None], False, cache)
        cfg = self.config
        h = self.model.embed_tokens(input_ids)
        if cfg.scale_emb != 1.0:
            h = h * cfg.scale_emb
        cos, sin = self.model.rotary_emb(positions, start + t)
        h = run_layers(self.native, self.model.layers, h, cos, sin, ctx, start, torch.arange(start, start + t)[None])
        h = self.model.norm(h)
        hk = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        return self.lm_head(hk if cfg.logit_scale == 1.0 else hk / cfg.logit_scale).float(), h

    @staticmethod
    def _attn_context(positions: torch.Tensor, cache: KVCache | None) -> tuple[AttnContext, int | None]:
        """Pick the cheapest exact masking: causal, or an explicit position mask.

        Returns the context and, when every row holds positions p0..p0+T-1, that p0 (the cache then writes a
        slice instead of scattering).
        """
        b, t = positions.shape
        first = positions[:, 0]
        p0 = int(first[0])
        # every row holds p0..p0+t-1 (true for a single sequence and for aligned batches)
        aligned = bool((first == p0).all()) and (t == 1 or bool((positions[:, -1] - first == t - 1).all()))
        seq_len = (p0 + t) if aligned else int(positions.max()) + 1
        if cache is None:
            if not aligned or p0 != 0:
                raise ValueError("without a cache, positions must be 0..T-1 for every row")
            return AttnContext(positions, t, None, True), None
        if seq_len > cache.max_len:
            raise ValueError(f"positions up to {seq_len - 1} do not fit a cache of {cache.max_len} slots")
        if aligned and p0 == 0:
            return AttnContext(positions, seq_len, None, True, cache), 0
        if aligned and t == 1:  # one query per row, every cached key is at or before it: no mask at all
            return AttnContext(positions, seq_len, None, False, cache), p0
        keys = torch.arange(seq_len, device=positions.device)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, seq_len]
        return AttnContext(positions, seq_len, mask, False, cache), (p0 if aligned else None)
