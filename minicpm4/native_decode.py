"""The decode step's layer stack in C++ (csrc/decode.cpp), for fused bf16 models on CPU.

A batch-1 decode step of a small model is bound by per-op overhead: the Python layers issue ~25 torch calls per
layer. `NativeDecoder` hands the whole stack to one C++ call that runs 4 matmuls, 1 SDPA and 4 fused loops per
layer, rounding exactly where model.py rounds. Its linear layers may be bf16, Int4Linear, Int8Linear or
TernaryLinear. It holds references to the model's own weight tensors (no copy).

Used by MiniCPM4ForCausalLM.forward when every condition of `NativeDecoder.build` and `usable` holds, the
Python layers otherwise; model.py's DecoderLayer is the reference (tests/test_native.py compares them).
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm4 import native
from minicpm4.int4_linear import Int4Linear
from minicpm4.int8_linear import Int8Linear
from minicpm4.ternary_linear import TernaryLinear

_EMPTY = torch.empty(0)


def _linear_args(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None:
    """(weight, scales, second scales, kind, group) for csrc/decode.cpp's Linear, or None for a layer it cannot
    run. Ternary layers run csrc/ternary_gemv.h, the kernel TernaryLinear itself calls."""
    if isinstance(m, Int4Linear):
        return m.qweight, m.scales_and_zeros, _EMPTY, 1, m.group_size
    if isinstance(m, Int8Linear):
        return m.qweight, m.scales, _EMPTY, 2, 0
    if isinstance(m, TernaryLinear):
        return m.planes, m.qscale, m.dscale, 3, 0
    if type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.bfloat16:
        return m.weight.detach(), _EMPTY, _EMPTY, 0, 0
    return None


class NativeDecoder:
    def __init__(self, stack):
        self.stack = stack

    @classmethod
    def build(cls, model) -> "NativeDecoder | None":
        """A decoder over `model`'s layers, or None when the extension is unavailable or a layer does not fit
        (not fused, not bf16, biases, another linear type)."""
        cfg = model.config
        layers = model.model.layers
        attn0 = layers[0].self_attn
        if attn0.qkv_proj is None or cfg.head_dim % 2:
            return None
        ext = native.extension("decode")
        if ext is None:
            return None
        stack = ext.DecodeStack(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                float(cfg.rms_norm_eps), float(layers[0].residual_scale))
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if attn.qkv_proj is None or mlp.gate_up_proj is None or any(w.dtype != torch.bfloat16 for w in norms):
                return None
            args = [_linear_args(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(a is None for a in args):
                return None
            w, s, s2, kinds, groups = (list(x) for x in zip(*args))
            stack.add_layer(norms[0].detach(), norms[1].detach(), w, s, s2, kinds, groups)
        return cls(stack)

    @staticmethod
    def usable(h: torch.Tensor, ctx) -> bool:
        """One new token per row, bf16, a bf16 cache without InfLLM v2 compressed keys (the C++ stack writes
        keys without updating them), no autograd."""
        return (h.shape[1] == 1 and h.dtype == torch.bfloat16 and ctx.cache is not None
                and ctx.cache.k.dtype == torch.bfloat16 and ctx.cache.compressed is None
                and not torch.is_grad_enabled())

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
        """h [B, 1, hidden] bf16 -> h after every layer; cos, sin [B, 1, 1, D] fp32 (model.RotaryEmbedding)."""
        b = h.shape[0]
        out = self.stack.forward(h.reshape(b, -1).contiguous(), cos.reshape(b, -1), sin.reshape(b, -1),
                                 ctx.cache.k, ctx.cache.v, ctx.positions[:, 0], ctx.kv_len,
                                 ctx.decode_bias(torch.bfloat16))
        return out.view(b, 1, -1)
