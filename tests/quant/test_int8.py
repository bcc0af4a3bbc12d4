"""Int8Linear (our few-row kernel up to 16 rows, a GEMM on dequantized rows beyond) on every instruction-set tier
against its pure-PyTorch references (the float weight, and the kernel's integer math on int8 activations,
Int8Linear.integer_reference), and the int4 model's int8 head."""

import numpy as np
import pytest
import torch

import minicpm4
from minicpm4 import kernels
from minicpm4.io.loader import save_pretrained
from minicpm4.model.decoder import cat_linears
from minicpm4.quant.int4 import Int4Linear
from minicpm4.quant.int8 import ACT_BLOCK, Int8Linear, quantize_activations


def test_quantization_is_round_to_nearest_per_row():
    # row maxima 127/64 and 127/16 give scales 1/64 and 1/16, exact in bf16, so q is checkable by hand
    w = torch.tensor([[1.984375, 0.5, -0.26, 0.01], [-7.9375, 1.0, 0.03, 3.3]])
    layer = Int8Linear.from_float(w)
    assert torch.equal(layer.scales, torch.tensor([1 / 64, 1 / 16], dtype=torch.bfloat16))
    assert torch.equal(layer.qweight, torch.tensor([[127, 32, -17, 1], [-127, 16, 0, 53]], dtype=torch.int8))
    assert (layer.dequantize() - w).abs().max() <= 1 / 32


def test_activations_quantize_per_block_to_the_nearest_step():
    x = torch.tensor([[0.5, -1.27, 0.004, 0.006] + [0.0] * 28 + [0.0] * 32])  # second block all zero
    x8, dx = quantize_activations(x, ACT_BLOCK)
    assert torch.allclose(dx, torch.tensor([[0.01, 0.0]]))
    assert x8[0, :4].tolist() == [50, -127, 0, 1] and not x8[0, 32:].any()  # 0.4 -> 0 and 0.6 -> 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    x8, dx = quantize_activations(x, ACT_BLOCK)
    step = dx.repeat_interleave(ACT_BLOCK, 1)
    assert ((x.float() - x8.float() * step).abs() <= step / 2 * (1 + 1e-6)).all()
    assert x8.abs().amax(1).eq(127).all()


def test_kernel_equals_reference(tier):
    """Every tier against its integer math and the float reference (beyond 16 rows: a GEMM on the dequantized
    weight, bf16 activations as they are). Bounds: bf16
    output rounding 2^-8 |y|, the fp32 sums 2^-16 |x^| @ |w|^T, and the activation rounding
    E = sum_blocks dx / 2 * sum_{k in block} |w| (|x - dx x8| <= dx / 2)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 128, generator=g)
    layer = Int8Linear.from_float(w)
    assert "int8 activations" in kernels.native().PATHS["int8 GEMM"]
    w_ref = layer.dequantize().double()
    for shape in [(1, 128), (7, 128), (2, 3, 128), (16, 128), (40, 128)]:  # few-row kernel up to 16 rows, GEMM beyond
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        ref = x.double() @ w_ref.T
        got = layer(x)
        assert got.shape == (*shape[:-1], 300) and got.dtype == torch.bfloat16
        x2, got, ref = x.reshape(-1, 128), got.double().reshape(-1, 300), ref.reshape(-1, 300)
        if x2.shape[0] > 16:  # the dequantized weight, fp32 sums
            tol = 2 ** -7 * (x2.double().abs() @ w_ref.abs().T) + 1e-3
            assert (got - ref).abs().le(tol).all()
            continue
        x8, dx = quantize_activations(x2, ACT_BLOCK)
        exact = layer.integer_reference(x2)
        tol_int = 2 ** -8 * exact.abs() + 2 ** -16 * ((x8.double().abs() * dx.double().repeat_interleave(ACT_BLOCK, 1)) @ w_ref.abs().T)
        assert (got - exact).abs().le(tol_int).all(), shape
        e = (dx.double() / 2) @ w_ref.abs().view(300, -1, ACT_BLOCK).sum(-1).T
        assert (got - ref).abs().le(tol_int + e * (1 + 2 ** -8)).all(), shape
    assert layer(torch.randn(2, 128)).dtype == torch.float32  # fp32 in, fp32 out (bf16 inside)


def test_our_kernel_runs_and_a_row_never_depends_on_its_neighbours(tier):
    """Each row bitwise what it is alone (speculative verification must round like a decode step); shapes our
    kernel does not take (K not a multiple of 32) give torch's result."""
    ext = kernels.native()
    assert ext is not None and ext.has_kernels()
    g = torch.Generator().manual_seed(2)
    layer = Int8Linear.from_float(torch.randn(298, 160, generator=g))  # 74 blocks of 4 rows and 2 more
    x = torch.randn(16, 160, generator=g).to(torch.bfloat16)
    assert ext.int8_supported(x, layer.qweight, layer.scales)
    together = layer(x)
    for rows in (slice(0, 1), slice(5, 6), slice(15, 16), slice(1, 4), slice(3, 16)):
        assert torch.equal(layer(x[rows]), together[rows]), rows
    odd = Int8Linear.from_float(torch.randn(64, 112, generator=g))  # (torch's kernel crashes at K = 100)
    x = torch.randn(3, 112, generator=g).to(torch.bfloat16)
    assert not ext.int8_supported(x, odd.qweight, odd.scales)
    assert torch.equal(odd(x), torch.ops.aten._weight_int8pack_mm(x, odd.qweight, odd.scales))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_concatenated_layers_compute_the_parts_side_by_side(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "int8":
        parts = [Int8Linear.from_float(torch.randn(n, 64, generator=g)) for n in (64, 32, 32)]
    else:  # random Q4_1 blocks: fp16 d and m, 16 bytes of nibbles per 32 weights
        def q4_1(n):
            d = np.random.default_rng(n).uniform(0.01, 0.1, (n, 2)).astype(np.float16).view(np.uint8)
            m = np.random.default_rng(n + 1).uniform(-1, 0, (n, 2)).astype(np.float16).view(np.uint8)
            qs = np.random.default_rng(n + 2).integers(0, 256, (n, 2, 16), dtype=np.uint8)
            return np.concatenate([d.reshape(n, 2, 2), m.reshape(n, 2, 2), qs], -1).reshape(n, 40)
        parts = [Int4Linear.from_q4_1(q4_1(n)) for n in (128, 64, 32)]
        # the CPU packing interleaves rows in blocks of 64: parts that split a block cannot be joined packed
        assert cat_linears([Int4Linear.from_q4_1(q4_1(n)) for n in (32, 32)]) is None
    fused = cat_linears(parts)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], -1))


def test_int4_model_has_an_int8_head_close_to_the_q8_0_one(smollm_gguf, real_text):
    ref, tok = minicpm4.load(smollm_gguf, dtype="bf16")
    model, _ = minicpm4.load(smollm_gguf, dtype="bf16", int4=True)
    assert isinstance(model.lm_head, Int8Linear)
    # the requantized head against the Q8_0 embedding it came from: within half a row step, per weight
    w = ref.lm_head.weight.float()
    err = (model.lm_head.dequantize() - w).abs()
    assert (err <= model.lm_head.scales.float()[:, None] / 2 * (1 + 2 ** -7) + 1e-6).all()
    # the embedding lookup keeps the exact Q8_0 values
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_fused_or_quantized_models_are_not_saved_as_hf(smollm_gguf, tmp_path):
    model, tok = minicpm4.load(smollm_gguf, dtype="bf16", int4=True)
    with pytest.raises(minicpm4.ConfigError, match="fused or quantized"):
        save_pretrained(model, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()
