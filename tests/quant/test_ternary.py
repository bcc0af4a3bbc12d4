"""TernaryLinear: packing round trip, the native kernel (decode gemv and prefill unpack + GEMM) against the
pure-PyTorch reference, the 8-bit group scale's bound, memory against bf16, and the native loader's fallback."""

import warnings

import pytest
import torch

from minicpm4 import kernels
from minicpm4.kernels import build
from minicpm4.model.decoder import cat_linears
from minicpm4.quant.primitives import dequantize, quantize_ternary
from minicpm4.quant.ternary import GEMV_MAX_ROWS, GROUP, TernaryLinear, pack_planes, unpack_planes


def weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows of different magnitude and some all-zero groups, as trained weights have
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1) * 0.05
    w[:3, :GROUP] = 0
    return w


def test_planes_round_trip_every_code_pattern():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (37, 4 * GROUP), generator=g, dtype=torch.int64)
    codes[0] = 1  # all-ones plane: bit 31 set, the int32 sign bit
    codes[1] = -1
    planes = pack_planes(codes)
    assert planes.dtype == torch.int32 and planes.shape == (37, 4, 2)
    assert not (planes[..., 0] & planes[..., 1]).any()  # never both +1 and -1
    assert torch.equal(unpack_planes(planes), codes.to(torch.int8))


def test_layer_holds_the_quantizer_codes_with_8_bit_group_scales():
    w = weights(64, 256)
    q = quantize_ternary(w, GROUP)
    layer = TernaryLinear.from_qtensor(q)
    assert torch.equal(layer.codes(), q.codes.to(torch.int8))
    # s ~= dscale * qscale, qscale in 0..255 rounded to nearest: off by at most half a step dscale ~= max s / 254,
    # and dscale is a bf16 value (checkpoints hold it in bf16 exactly)
    step = layer.dscale[:, None]
    assert torch.equal(layer.dscale.to(torch.bfloat16).float(), layer.dscale)
    assert (step <= q.scales.amax(1, keepdim=True) / 254 * (1 + 2 ** -8)).all()
    assert ((layer.scales() - q.scales).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
    rel = (layer.dequantize() - dequantize(q)).abs().sum() / dequantize(q).abs().sum()
    assert rel < 0.01


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 37])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_reference(rows, dtype, tier):
    """Every instruction-set tier's gemv (tests/conftest.py's `tier`): AVX512-BF16, AVX-512 masks, the AVX2 / NEON
    code table, scalar."""
    ext = kernels.native()
    layer = TernaryLinear.from_float(weights(203, 320, seed=rows))  # 203 rows: the 4-row blocks leave a tail
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 320, generator=g).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 203)
    w = layer.dequantize().double()
    ref = x.double() @ w.T
    # fp32 accumulation in another order, plus bf16 rounding of the output (and the unpacked weight in prefill)
    # (prefill, more than GEMV_MAX_ROWS rows, multiplies in bf16 whatever x's dtype)
    ulp = 2 ** -7 if dtype == torch.bfloat16 or rows > GEMV_MAX_ROWS else 2 ** -20
    tol = ulp * (x.double().abs() @ w.abs().T) + 1e-6
    assert (got.double() - ref).abs().le(tol).all()
    assert (layer.forward_reference(x).double() - ref).abs().le(tol).all()


def test_batched_input_shape_and_concatenation():
    parts = [TernaryLinear.from_float(weights(n, 64, seed=n)) for n in (48, 16, 8)]
    joined = cat_linears(parts)
    x = torch.randn(2, 3, 64)
    assert torch.allclose(joined(x), torch.cat([p(x) for p in parts], -1), rtol=1e-5, atol=1e-6)


def test_weight_memory_is_under_015_of_bf16():
    layer = TernaryLinear.from_float(weights(1536, 576))
    nbytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert nbytes / (1536 * 576 * 2) <= 0.15


def test_rejects_non_ternary_or_wrong_group():
    with pytest.raises(ValueError, match="group size 32"):
        TernaryLinear.from_qtensor(quantize_ternary(weights(8, 128), 64))
    with pytest.raises(ValueError, match="divisible by 32"):
        TernaryLinear(100, 8)


def test_loader_falls_back_to_reference_when_disabled(monkeypatch):
    layer = TernaryLinear.from_float(weights(40, 64))
    x = torch.randn(1, 64)
    fast = layer(x)
    monkeypatch.setenv("MINICPM4_NATIVE", "0")
    build._build.cache_clear()
    try:
        assert kernels.native() is None
        assert torch.allclose(layer(x), fast, rtol=1e-5, atol=1e-6)
    finally:
        build._build.cache_clear()


def test_loader_warns_once_without_a_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-minicpm4")
    build._build.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kernels.native() is None
            assert kernels.native() is None
        assert len(caught) == 1 and "C++ compiler" in str(caught[0].message)
    finally:
        build._build.cache_clear()
