"""The decode step's layer stack in C++ (csrc/decode_stack.h), for fused bf16 models on CPU.

A batch-1 decode step of a small model is bound by per-op overhead: the Python layers issue ~25 torch calls per
layer. `NativeDecoder` hands the whole stack to one C++ call that runs 4 matmuls, 1 attention call and 4 fused
loops per layer, rounding where model/decoder.py rounds. Its linear layers may be bf16, Int4Linear, Int8Linear or
TernaryLinear. It holds references to the model's own weight tensors (no copy).

The same call takes T > 1 new tokens with explicit cache slots and an attention mask: a speculative round's tree
verification (MiniCPM4ForCausalLM.forward_masked) and the EAGLE draft layer's passes (spec/eagle.py) run through it, and
so do dense models' prefill chunks (causal: no mask tensor; BENCHMARKS.md has the prefill speed against the Python
layers).

InfLLM v2 models (sparse_config without use_nope) run the same stack for decode steps (T = 1): attention becomes the
C++ sparse step (csrc/sparse_attention.h) from dense_len keys on, and the stack keeps the cache's compressed keys
up to date as the Python backend would (tests/sparse/test_sparse_native.py compares them).

Used by MiniCPM4ForCausalLM.forward and forward_masked when every condition of `NativeDecoder.build` and
`usable` holds, the Python layers otherwise; model/decoder.py's DecoderLayer is the reference (tests/model/test_native.py and
tests/model/test_native_masked.py compare them).
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm4 import kernels
from minicpm4.kernels import LayerKind
from minicpm4.model.decoder import dense_attention
from minicpm4.quant.int4 import Int4Linear
from minicpm4.quant.int8 import Int8Linear
from minicpm4.quant.ternary import TernaryLinear

_EMPTY = torch.empty(0)


def _linear_args(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None:
    """(weight, scales, second scales, kind, group) for csrc/decode_stack.h's Linear, or None for a layer it cannot
    run. Ternary layers run csrc/ternary_gemv.h, the kernel TernaryLinear itself calls."""
    if isinstance(m, Int4Linear):
        return m.qweight, m.scales_and_zeros, _EMPTY, LayerKind.INT4, m.group_size
    if isinstance(m, Int8Linear):
        return m.qweight, m.scales, _EMPTY, LayerKind.INT8, 0
    if isinstance(m, TernaryLinear):
        return m.planes, m.qscale, m.dscale, LayerKind.TERNARY, 0
    if type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.bfloat16:
        return m.weight.detach(), _EMPTY, _EMPTY, LayerKind.BF16, 0
    return None


class NativeDecoder:
    def __init__(self, stack, sparse=None, int8_cache: bool = False):
        self.stack = stack
        self.sparse = sparse  # the SparseConfig the stack runs, or None (dense)
        self.int8_cache = int8_cache  # whether its attention kernels take an int8 KV cache (their shapes: GQA <= 16, D <= 256)

    @classmethod
    def build(cls, model, sparse=None) -> "NativeDecoder | None":
        """A decoder over `model`'s layers, or None when the extension is unavailable or a layer does not fit
        (not fused, not bf16, biases, another linear type). sparse: the SparseConfig of the layers' InfLLM v2
        backend (None: dense attention)."""
        cfg = model.config
        if sparse is not None and (sparse.use_nope or cfg.num_attention_heads // cfg.num_key_value_heads > 16
                                   or cfg.head_dim > 256):
            return None  # use_nope needs the pre-RoPE keys, which the C++ stack does not keep
        return cls.for_layers(cfg, model.model.layers, sparse)

    @classmethod
    def for_layers(cls, cfg, layers, sparse=None) -> "NativeDecoder | None":
        """A decoder over a list of model.DecoderLayer sharing `cfg`'s head shapes (a model's, or a draft's)."""
        attn0 = layers[0].self_attn
        if attn0.qkv_proj is None or cfg.head_dim % 2:
            return None
        ext = kernels.native()
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
        if sparse is not None:
            stack.set_sparse(sparse.kernel_size, sparse.kernel_stride, sparse.block_size, sparse.init_blocks,
                             sparse.local_blocks, sparse.topk, sparse.dense_len)
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        return cls(stack, sparse, cfg.num_attention_heads % cfg.num_key_value_heads == 0 and g <= 16
                   and cfg.head_dim <= 256)

    def usable(self, h: torch.Tensor, ctx) -> bool:
        """bf16, one new token per row or (dense stacks) T tokens with an explicit mask or causal, a bf16 cache (stored
        bf16, or int8 read in place: quant/kv8.py), no autograd; InfLLM v2 compressed keys in the cache exactly when the stack is sparse, laid out for its kernel
        sizes (a dense stack writes keys without updating them)."""
        if not ((h.shape[1] == 1 or (ctx.mask is not None or ctx.is_causal) and self.sparse is None)
                and h.dtype == torch.bfloat16
                and ctx.cache is not None and ctx.cache.dtype == torch.bfloat16 and not torch.is_grad_enabled()
                and (ctx.cache.k_scale is None or self.int8_cache)):
            return False
        store = ctx.cache.compressed
        if self.sparse is None or store is None:
            return self.sparse is None and store is None
        return ((store.cfg.kernel_size, store.cfg.kernel_stride, store.cfg.use_nope)
                == (self.sparse.kernel_size, self.sparse.kernel_stride, False) and store.c[0].dtype == torch.bfloat16)

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx,
                 slots: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """h [B, T, hidden] bf16 -> h after every layer; cos, sin [B, T, 1, D] fp32 (model.RotaryEmbedding);
        slots [B, T]: the cache slot of each token (default: its position). causal: each token sees the slots up
        to its own, whatever ctx's mask says (aligned prefill chunks: no mask tensor for the kernel to read)."""
        b, t, _ = h.shape
        slots = ctx.positions if slots is None else slots
        if self.sparse is not None:
            store = ctx.cache.compressed
            self.stack.attach_sparse(store.c[0], store.c[1], store.covered)
        bias = None if causal else ctx.decode_bias(torch.bfloat16)
        cache = ctx.cache
        return self.stack.forward(h.contiguous(), cos.reshape(b, t, -1), sin.reshape(b, t, -1), cache.k, cache.v,
                                  slots.expand(b, t), ctx.kv_len, bias, cache.k_scale, cache.v_scale)


def attach(model):
    """Inference set-up of `model`: fuse its projections, then attach the C++ decode stack as `model.native` where
    it fits (the extension builds, the weights are bf16 or int4/int8/ternary layers, and every layer shares one
    attention backend, dense or InfLLM v2); otherwise `model.native` is None and the Python layers run. Returns
    the model. The model itself never builds the stack: its Python layers are the stack's reference."""
    model.fuse_projections()
    backend = model.model.layers[0].self_attn.backend
    sparse = getattr(backend, "sparse_config", None)  # sparse.attention.make_backend's InfLLM v2 backend
    same = all(layer.self_attn.backend is backend for layer in model.model.layers)
    model.native = NativeDecoder.build(model, sparse) if same and (backend is dense_attention or sparse) else None
    return model
