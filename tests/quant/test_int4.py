"""Int4Linear (our kernel for up to 16 rows, torch's int4pack CPU kernel beyond) against a pure-PyTorch reference
built from the GGUF bytes, and the default model with its Q4_1 weights kept 4-bit against the same model
dequantized to fp32."""

import gguf
import numpy as np
import pytest
import torch

import minicpm4
from minicpm4 import kernels
from minicpm4.quant.int4 import Int4Linear, unpack_q4_1

# our few-row kernels are AVX512-BF16 code; elsewhere torch's kernel runs, and the other tests here check results
needs_bf16 = pytest.mark.skipif("avx512_bf16" not in kernels.cpu_flags(),
                                reason="this CPU lacks avx512_bf16, which our int4/int8 few-row kernels need")


@pytest.fixture(scope="module")
def q4_1_tensors(smollm_gguf):
    reader = gguf.GGUFReader(smollm_gguf)
    names = ("blk.0.attn_k.weight", "blk.3.ffn_down.weight", "blk.29.ffn_gate.weight")
    return [t for t in reader.tensors if t.name in names]


def test_unpack_matches_the_gguf_dequantizer(q4_1_tensors):
    for t in q4_1_tensors:
        q, d, m = unpack_q4_1(np.array(t.data))
        w = (q.reshape(q.shape[0], -1, 32) * d[..., None] + m[..., None]).reshape(q.shape)
        assert np.array_equal(w, gguf.quants.dequantize(t.data, t.tensor_type)), t.name


def test_kernel_equals_reference_within_bf16_scale_rounding(q4_1_tensors):
    g = torch.Generator().manual_seed(0)
    for t in q4_1_tensors:
        layer = Int4Linear.from_q4_1(np.array(t.data))
        q, d, m = unpack_q4_1(np.array(t.data))
        # reference: the layout's formula with scale and zero rounded to bf16 as the layer holds them
        scale = torch.from_numpy(d).to(torch.bfloat16).double()
        zero = torch.from_numpy(m + 8 * d).to(torch.bfloat16).double()
        qt = torch.from_numpy(q).double().view(q.shape[0], -1, 32)
        w_ref = ((qt - 8) * scale[..., None] + zero[..., None]).view(q.shape)
        for rows in (1, 5, 16, 40):  # the few-row kernel up to 16 rows (in chunks of 6), dequantized bf16 beyond
            x = torch.randn(rows, layer.in_features, generator=g).to(torch.bfloat16)
            got = layer(x).double()
            ref = x.double() @ w_ref.T
            tol = 2 ** -7 * (x.double().abs() @ w_ref.abs().T) + 1e-3  # bf16 output rounding, fp32 accumulation
            assert (got - ref).abs().le(tol).all(), (t.name, rows)
        # and the bf16 scale rounding itself stays within one bf16 ulp of the Q4_1 float weight
        w_q41 = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).double()
        bound = 2 ** -8 * (8 * torch.from_numpy(d).double().abs() + torch.from_numpy(m + 8 * d).double().abs())
        assert ((w_ref - w_q41).abs().view(q.shape[0], -1, 32) <= bound[..., None] + 1e-12).all()


@needs_bf16
def test_our_kernel_runs_and_a_row_never_depends_on_its_neighbours(q4_1_tensors):
    """Speculative verification runs 12 rows where plain decode runs 1: each row's result must be bitwise what it
    is alone, or greedy outputs could differ. Also: the kernel is really taken for <= 16 rows on this CPU."""
    ext = kernels.native()
    assert ext is not None and ext.has_kernels()
    g = torch.Generator().manual_seed(1)
    for t in q4_1_tensors:
        layer = Int4Linear.from_q4_1(np.array(t.data))
        x = torch.randn(16, layer.in_features, generator=g).to(torch.bfloat16)
        assert ext.int4_supported(x, layer.qweight, layer.group_size, layer.scales_and_zeros)
        assert not ext.int4_supported(torch.cat([x, x, x]), layer.qweight, layer.group_size, layer.scales_and_zeros)
        together = layer(x)
        for rows in (slice(0, 1), slice(3, 4), slice(15, 16), slice(2, 9), slice(4, 16)):
            assert torch.equal(layer(x[rows]), together[rows]), (t.name, rows)


@needs_bf16
def test_a_part_block_of_rows_goes_to_torchs_kernel(q4_1_tensors):
    """96 output rows: one whole block of 64 (our kernel) and a part block (packed in another layout: torch's), so
    rows get the same kernel whether or not their layer is concatenated with others."""
    raw = np.array(q4_1_tensors[0].data)[:96]
    layer, head, tail = (Int4Linear.from_q4_1(r) for r in (raw, raw[:64], raw[64:]))
    x = torch.randn(3, layer.in_features).to(torch.bfloat16)
    ext = kernels.native()
    assert ext.int4_supported(x, head.qweight, head.group_size, head.scales_and_zeros)
    assert not ext.int4_supported(x, tail.qweight, tail.group_size, tail.scales_and_zeros)
    got = layer(x)
    assert torch.equal(got[:, :64], head(x))
    want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, tail.qweight, tail.group_size, tail.scales_and_zeros)
    assert torch.equal(got[:, 64:], want)


def test_int4_model_keeps_quality_on_real_text(smollm_gguf, real_text):
    ref, tok = minicpm4.load(smollm_gguf, dtype="fp32")
    int4, _ = minicpm4.load(smollm_gguf, dtype="bf16", int4=True)
    assert isinstance(int4.model.layers[0].mlp.down_proj, Int4Linear)
    ids = torch.tensor([tok.encode(real_text)[:256]])
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(m(ids)[0, :-1], ids[0, 1:]).item() for m in (ref, int4)]
    print(f"perplexity fp32 {np.exp(nll[0]):.3f}, int4 {np.exp(nll[1]):.3f}")
    assert np.exp(nll[1]) / np.exp(nll[0]) < 1.02  # same Q4_1 weights: only bf16 activations and scales differ


def test_int4_needs_a_gguf(tmp_path):
    with pytest.raises(minicpm4.ConfigError, match="int4 loading reads Q4_1 weights from a GGUF file"):
        minicpm4.load(tmp_path, int4=True)
