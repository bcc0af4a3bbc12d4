"""Quantization primitives (minicpm4/quant/primitives.py) and GPTQ / P-GPTQ calibration (minicpm4/quant/gptq.py).

Round trips are checked against the per-format bounds (|W_q - W| <= s/2; ternary: W_q in {-s, 0, s}), the fast
layers against x @ dequantize(q)^T, and GPTQ against RTN on the default model's own activations.
"""

import pytest
import torch

import minicpm4
from minicpm4.quant.gptq import HessianAccumulator, calibrate, gptq_quantize, quantize_model_weights
from minicpm4.quant.primitives import (dequantize, fake_quantize, quantize_int, quantize_ternary, ste,
                                       to_int4_linear, to_int8_linear)

INT_FORMATS = [(8, None, True), (8, None, False)] + [(4, g, sym) for g in (32, 64, 128) for sym in (True, False)]
REAL_LAYERS = ["model.layers.2.mlp.down_proj", "model.layers.10.mlp.down_proj",
               "model.layers.2.self_attn.q_proj", "model.layers.20.self_attn.o_proj"]


@pytest.fixture(scope="module")
def model_tok(smollm_gguf):
    return minicpm4.load(smollm_gguf, dtype="fp32")


@pytest.fixture(scope="module")
def real_weights(model_tok):
    return [model_tok[0].get_submodule(name).weight.detach() for name in REAL_LAYERS]


def random_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[3, :128] = 0  # all-zero groups must not produce NaN
    w[5, 7] = 1.0  # an outlier
    return [w]


def check_int_round_trip(w, bits, group_size, symmetric):
    group_size = group_size or w.shape[1]
    q = quantize_int(w, bits, group_size, symmetric)
    dq = dequantize(q)
    assert torch.isfinite(dq).all()
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    assert q.codes.min() >= lo and q.codes.max() <= hi
    if not symmetric:
        assert q.zeros.min() >= 0 and q.zeros.max() <= hi
    scale = q.scales.repeat_interleave(group_size, dim=1)
    # ties land exactly on s/2; fp32 rounding of w/s and of (c - z)*s (|c - z| <= 255) adds ~2^-24 * 255 * s
    assert ((dq - w).abs() <= scale / 2 * (1 + 1e-4)).all()
    assert q.scales.shape == (w.shape[0], w.shape[1] // group_size)


@pytest.mark.parametrize("bits,group_size,symmetric", INT_FORMATS)
def test_int_round_trip_random(bits, group_size, symmetric):
    for w in random_weights():
        check_int_round_trip(w, bits, group_size, symmetric)
    assert (dequantize(quantize_int(random_weights()[0], bits, 32 if group_size else 256, symmetric))[3, :128]
            == 0).all()


def test_int_round_trip_real(real_weights):
    for w in real_weights:
        for bits, group_size, symmetric in INT_FORMATS:
            if group_size and w.shape[1] % group_size:  # the default model's hidden size 576 = 4.5 x 128
                with pytest.raises(ValueError, match="not divisible"):
                    quantize_int(w, bits, group_size, symmetric)
            else:
                check_int_round_trip(w, bits, group_size, symmetric)


def check_ternary(w, group_size=32):
    q = quantize_ternary(w, group_size)
    s = w.reshape(w.shape[0], -1, group_size).abs().mean(-1).clamp_min(1e-5)
    torch.testing.assert_close(q.scales, s, rtol=0, atol=0)
    s_full = s.repeat_interleave(group_size, dim=1)
    assert torch.equal(q.codes.float(), (w / s_full).round().clamp(-1, 1))
    dq = dequantize(q)
    assert ((dq == s_full) | (dq == 0) | (dq == -s_full)).all()


def test_ternary_round_trip(real_weights):
    for w in random_weights() + real_weights:
        check_ternary(w)


def test_literal_cases():
    # symmetric 4-bit, one group of 4: s = 1.4/7 = 0.2, codes round(w/0.2)
    q = quantize_int(torch.tensor([[0.2, -1.4, 0.5, 0.0]]), 4, 4, True)
    torch.testing.assert_close(q.scales, torch.tensor([[0.2]]))
    assert q.codes.tolist() == [[1, -7, 2, 0]]  # 0.5 / 0.2 = 2.5 rounds to even
    # asymmetric 2-bit: range [-1, 2] -> s = 1, z = 1, codes round(w) + 1
    q = quantize_int(torch.tensor([[-1.0, 0.4, 2.0, 0.6]]), 2, 4, False)
    assert q.scales.tolist() == [[1.0]] and q.zeros.tolist() == [[1]] and q.codes.tolist() == [[0, 1, 3, 2]]
    torch.testing.assert_close(dequantize(q), torch.tensor([[-1.0, 0.0, 2.0, 1.0]]))
    # asymmetric, all positive: 0 is kept in the range, so z = 0 and s = 3/3
    q = quantize_int(torch.tensor([[1.0, 3.0, 2.0, 2.0]]), 2, 4, False)
    assert q.zeros.tolist() == [[0]] and q.codes.tolist() == [[1, 3, 2, 2]]
    # ternary: s = mean|w| = 0.5, codes clamp(round(w / 0.5), -1, 1)
    q = quantize_ternary(torch.tensor([[1.0, -0.2, 0.2, -0.6]]), 4)
    assert q.scales.tolist() == [[0.5]] and q.codes.tolist() == [[1, 0, 0, -1]]
    # all zero: scale 1, codes 0
    q = quantize_int(torch.zeros(1, 4), 4, 4, True)
    assert q.scales.tolist() == [[1.0]] and torch.equal(dequantize(q), torch.zeros(1, 4))


def test_fake_quantize_and_ste():
    w = random_weights()[0].requires_grad_()
    wq = fake_quantize(w, 4, 32)
    torch.testing.assert_close(wq, dequantize(quantize_int(w, 4, 32, True)))
    y = ste(w, wq)
    assert torch.equal(y, wq)
    (y * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))
    assert torch.equal(fake_quantize(w, ternary=True, group_size=32), dequantize(quantize_ternary(w, 32)))


def close_to_reference(layer, q):
    x = torch.randn(5, q.shape[1], generator=torch.Generator().manual_seed(1))
    ref = x @ dequantize(q).T
    y = layer(x)
    # the kernels hold scale and zero in bf16 and take bf16 activations: bf16 rounding, relative to |x| |W|^T
    bound = 2 ** -6 * (x.abs() @ dequantize(q).abs().T) + 1e-6
    assert ((y - ref).abs() <= bound).all(), (y - ref).abs().max()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_linear_matches_dequantize(real_weights, group_size, symmetric):
    for w in random_weights() + real_weights[:1]:
        q = quantize_int(w, 4, group_size, symmetric)
        close_to_reference(to_int4_linear(q), q)


def test_ternary_on_int4_linear_and_int8_linear(real_weights):
    w = real_weights[2]
    q = quantize_ternary(w, 32)
    close_to_reference(to_int4_linear(q), q)
    q = quantize_int(w, 8, w.shape[1], True)
    close_to_reference(to_int8_linear(q), q)
    with pytest.raises(ValueError, match="per-output-channel"):
        to_int8_linear(quantize_int(w, 8, 64, True))
    with pytest.raises(ValueError, match="at most 4-bit"):
        to_int4_linear(quantize_int(w, 8, 64, True))


def test_pgptq_hessian_excludes_prefix():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 20, 16, generator=g, dtype=torch.float64)
    x[:, :4] *= 1000  # huge first positions, like BOS in deep down-projections
    skip, plain, trimmed = HessianAccumulator(16, 4), HessianAccumulator(16, 0), HessianAccumulator(16, 0)
    skip.add(x), plain.add(x), trimmed.add(x[:, 4:])
    assert skip.n == trimmed.n == 3 * 16 and plain.n == 3 * 20
    assert torch.equal(skip.H, trimmed.H)
    assert not torch.allclose(skip.H, plain.H)
    torch.testing.assert_close(skip.hessian(include_prefix=True), plain.H)
    torch.testing.assert_close(trimmed.H, 2 / 48 * x[:, 4:].reshape(-1, 16).T @ x[:, 4:].reshape(-1, 16))


def test_gptq_identity_hessian_is_rtn():
    # with H = I no column informs another: the error feedback is zero and GPTQ is RTN
    w = random_weights()[0]
    for sym in (True, False):
        gq, rq = gptq_quantize(w, torch.eye(256), 4, 64, sym), quantize_int(w, 4, 64, sym)
        assert torch.equal(gq.codes, rq.codes)
        torch.testing.assert_close(gq.scales, rq.scales)


def test_gptq_beats_rtn_on_real_activations(model_tok, real_text):
    # 12 calibration sequences of 128 tokens (BOS first) and 2 held out, interleaved through the text so both
    # see the same kinds of passage; with fewer samples than K (576 or 1536) GPTQ overfits the calibration set
    model, tok = model_tok
    ids = tok.encode(real_text)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    seqs = [bos + ids[i * 127:(i + 1) * 127] for i in range(24)]
    calib, held_out = torch.tensor(seqs[0::2]), torch.tensor([seqs[5], seqs[13]])
    hessians = calibrate(model, [calib], REAL_LAYERS, skip_prefix=4)
    assert all(h.n == 12 * 124 and h.n_prefix == 12 * 4 for h in hessians.values())
    inputs = {}  # held-out layer inputs [2, 128, K]
    hooks = [model.get_submodule(nm).register_forward_hook(
        lambda _m, inp, _o, nm=nm: inputs.__setitem__(nm, inp[0].double())) for nm in REAL_LAYERS]
    with torch.no_grad():
        model(held_out, logits_to_keep=1)
    for h in hooks:
        h.remove()

    # 4-bit symmetric, group 128 (MiniCPM4's W4A16) where K allows; K = 576 (hidden size) takes group 64
    qs = {m: {} for m in ("rtn", "gptq", "pgptq")}
    for nm in REAL_LAYERS:
        group = 128 if model.get_submodule(nm).in_features % 128 == 0 else 64
        for m in qs:
            qs[m].update(quantize_model_weights(model, {nm: hessians[nm]}, m, 4, group, True))
    for nm in REAL_LAYERS:
        x, w = inputs[nm], model.get_submodule(nm).weight.double()
        err = {m: ((x @ (w - dequantize(qs[m][nm]).double()).T) ** 2).sum().item() for m in qs}
        err_tail = {m: ((x[:, 4:] @ (w - dequantize(qs[m][nm]).double()).T) ** 2).sum().item() for m in qs}
        print(f"{nm}: held-out ||XW^T - XWq^T||^2  all positions " +
              " ".join(f"{m}={e:.4g}" for m, e in err.items()) + "  | positions >= 4 " +
              " ".join(f"{m}={e:.4g}" for m, e in err_tail.items()))
        assert err["gptq"] < err["rtn"] and err_tail["gptq"] < err_tail["rtn"]
        # P-GPTQ vs GPTQ: it wins on positions >= 4 here but by as little as 1%, so only the margin over RTN
        # (on the positions it was fitted to) is asserted; with BOS included it can lose to GPTQ
        assert err_tail["pgptq"] < err_tail["rtn"]


def test_calibrate_hessian_equals_a_per_sequence_reference():
    """calibrate() through a real model, two batches of 3 and 2 sequences (BOS-first rows of different
    content), against the textbook sum: H = 2/n sum over every sequence s and position t >= skip of
    x_{s,t} x_{s,t}^T, with n the number of such (s, t), x taken from each sequence run on its own."""
    from minicpm4.config import tiny
    from minicpm4.model.decoder import MiniCPM4ForCausalLM
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny()).eval()
    seqs = torch.randint(3, 512, (5, 24))
    seqs[:, 0] = 1  # BOS
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    accs = calibrate(model, [seqs[:3], seqs[3:]], names, skip_prefix=4)
    for name in names:
        xs = []
        hook = model.get_submodule(name).register_forward_hook(lambda _m, inp, _o: xs.append(inp[0][0].double()))
        with torch.no_grad():
            for s in seqs:
                model(s[None])
        hook.remove()
        ref, ref_all, n = torch.zeros(xs[0].shape[1], xs[0].shape[1], dtype=torch.float64), 0, 0
        for x in xs:  # x [T, K] of one sequence
            for t in range(x.shape[0]):
                outer = torch.outer(x[t], x[t])
                ref_all = ref_all + outer
                if t >= 4:
                    ref, n = ref + outer, n + 1
        assert accs[name].n == n == 5 * 20 and accs[name].n_prefix == 5 * 4
        torch.testing.assert_close(accs[name].H, 2 / n * ref, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(accs[name].hessian(include_prefix=True), 2 / (5 * 24) * ref_all, rtol=1e-5, atol=1e-8)


def test_act_order_gptq(real_weights, model_tok, real_text):
    """act-order (static groups) keeps groups contiguous, so its QTensor is the plain layout: every code within
    range, every weight on its own group's grid; on a real layer's Hessian its output error is not worse than
    plain GPTQ's by more than noise and beats RTN."""
    model, tok = model_tok
    name = "model.layers.2.self_attn.q_proj"
    ids = tok.encode(real_text)
    batch = torch.tensor([[tok.bos_token_id] + ids[i * 95:(i + 1) * 95] for i in range(8)])
    H = calibrate(model, [batch], [name], skip_prefix=0, stop_after=model.model.layers[2])[name].H
    w = model.get_submodule(name).weight.detach()
    for sym in (True, False):
        q = gptq_quantize(w, H, 4, 64, sym, act_order=True)
        rtn = quantize_int(w, 4, 64, sym)
        assert q.codes.shape == w.shape and q.scales.shape == rtn.scales.shape
        torch.testing.assert_close(q.scales, rtn.scales)  # static groups: the scales of the original weights
        lo, hi = (-7, 7) if sym else (0, 15)
        assert q.codes.min() >= lo and q.codes.max() <= hi
        err = {m: torch.trace((w - dequantize(qq)).double() @ H @ (w - dequantize(qq)).double().T).item()
               for m, qq in (("act", q), ("plain", gptq_quantize(w, H, 4, 64, sym)), ("rtn", rtn))}
        assert err["act"] < err["rtn"] and err["act"] < 1.1 * err["plain"], err


def test_sequential_gptq_feeds_quantized_inputs_forward():
    """quantize_sequential: layer 0 sees the float model's inputs (same codes as one-pass GPTQ), layer 1 the
    outputs of quantized layer 0 (its Hessian, so its codes, differ); the model itself is left unchanged."""
    from minicpm4.config import tiny
    from minicpm4.model.decoder import MiniCPM4ForCausalLM
    from minicpm4.quant.gptq import quantize_sequential
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(3, 512, (4, 32))]
    seq = quantize_sequential(model, batches, "gptq", 4, 32)
    one = quantize_model_weights(model, calibrate(model, batches, skip_prefix=4), "gptq", 4, 32)
    assert seq.keys() == one.keys() and len(seq) == 2 * 7
    for name in one:
        same = torch.equal(seq[name].codes, one[name].codes)
        assert same == name.startswith("model.layers.0."), name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
