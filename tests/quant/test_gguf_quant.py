"""GGUF Q4_0 / Q4_1 / Q8_0 blocks (made by the gguf package's own quantizer) put into Int4Linear / Int8Linear,
checked against the gguf package's dequantize-to-float."""

import gguf
import numpy as np
import pytest
import torch

from minicpm4.quant.gguf_blocks import gguf_linear, unpack_q4_0, unpack_q8_0
from minicpm4.quant.int4 import Int4Linear, unpack_q4_1
from minicpm4.quant.int8 import Int8Linear

Q = gguf.GGMLQuantizationType


def blocks(kind, n=96, k=256, seed=0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    w[0, :32] = 0  # an all-zero block (d = 0)
    raw = gguf.quants.quantize(w, kind)
    return raw, torch.from_numpy(gguf.quants.dequantize(raw, kind)).double()


def test_unpack_matches_the_gguf_dequantizer():
    raw, ref = blocks(Q.Q4_0)
    q, d = unpack_q4_0(raw)
    assert np.array_equal((q.reshape(96, -1, 32) - 8) * d[..., None], ref.numpy().reshape(96, -1, 32))
    raw, ref = blocks(Q.Q8_0)
    q, d = unpack_q8_0(raw)
    assert np.array_equal(q.reshape(96, -1, 32) * d[..., None], ref.numpy().reshape(96, -1, 32))


def check_layer(layer, w_ref, x):
    got = layer(x).double()
    ref = x.double() @ w_ref.T
    tol = 2 ** -7 * (x.double().abs() @ w_ref.abs().T) + 1e-4  # bf16 output rounding, fp32 accumulation
    assert (got - ref).abs().le(tol).all()


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1])
def test_4_bit_blocks_go_into_int4_linear_exactly_up_to_bf16_scales(kind):
    raw, ref = blocks(kind)
    layer = gguf_linear(kind, raw)
    assert isinstance(layer, Int4Linear) and layer.weight_shape == (96, 256)
    # the layer's weight (identity through the kernel) = (u - 8) * scale + zero with scale and zero rounded to
    # bf16 (relative error <= 2^-8 each): off by at most 2^-8 * (8 |scale| + |zero|) per block; plus the kernel's
    # bf16 roundings of the weight and of its output, 2^-8 |w| each
    w_layer = layer(torch.eye(256, dtype=torch.bfloat16)).double().T
    if kind == Q.Q4_0:
        d, zero = unpack_q4_0(raw)[1], 0
    else:
        _, d, m = unpack_q4_1(raw)
        zero = np.abs(m + 8 * d)
    bound = torch.from_numpy(2 ** -8 * (8 * np.abs(d) + zero)).double().repeat_interleave(32, dim=1)
    assert ((w_layer - ref).abs() <= bound + 2 ** -7 * ref.abs() + 1e-12).all()
    check_layer(layer, w_layer, torch.randn(3, 256).to(torch.bfloat16))


def test_q8_0_goes_into_int8_linear_requantized_per_row():
    raw, ref = blocks(Q.Q8_0)
    layer = gguf_linear(Q.Q8_0, raw)
    assert isinstance(layer, Int8Linear)
    step = layer.scales.double()[:, None]  # one scale per row: off by at most half a step (+ bf16 scale)
    assert ((layer.dequantize().double() - ref).abs() <= step / 2 + 2 ** -8 * ref.abs()).all()
    check_layer(layer, layer.dequantize().double(), torch.randn(3, 256).to(torch.bfloat16))


def test_other_types_are_refused():
    with pytest.raises(ValueError, match="GGUF type Q5_0 has no quantized layer"):
        gguf_linear(Q.Q5_0, np.zeros((16, 22), dtype=np.uint8))
