"""GPTQ-layout quantized checkpoints (minicpm4/quant/gptq_format.py) and `minicpm4 quantize`."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import minicpm4
from minicpm4.errors import CheckpointError
from minicpm4.model.native_stack import attach
from minicpm4.quant.gptq_format import pack_rows, save_quantized
from minicpm4.quant.int4 import Int4Linear
from minicpm4.quant.int8 import Int8Linear
from minicpm4.quant.primitives import dequantize, quantize_int


@pytest.fixture(scope="module")
def float_model(smollm_gguf):
    return minicpm4.load(smollm_gguf, dtype="bf16")


def _quantize_all(model, bits, group_size):
    return {nm: quantize_int(m.weight, bits, m.in_features if bits == 8 else group_size, True)
            for nm, m in model.named_modules() if isinstance(m, torch.nn.Linear) and nm != "lm_head"}


def _ppl(model, ids):
    with torch.no_grad():
        logits = model(ids[None])[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[1:]).exp().item()


@pytest.mark.parametrize("bits,cls", [(4, Int4Linear), (8, Int8Linear)])
def test_round_trip(float_model, real_text, tmp_path, bits, cls):
    model, tok = float_model
    qt = _quantize_all(model, bits, 64)
    out = save_quantized(model, qt, tok, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "gptq", "bits": bits, "group_size": 64 if bits == 4 else -1,
                   "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    qmodel, _ = minicpm4.load(out)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    for name, q in qt.items():
        layer = qmodel.get_submodule(name)
        assert isinstance(layer, cls)
        if name.startswith("model.layers.0."):
            xin = torch.randn(3, q.shape[1], dtype=torch.bfloat16) if q.shape[1] != 576 else x
            ref = xin.float() @ dequantize(q).T
            err = (layer(xin).float() - ref).abs().max() / ref.abs().max()
            assert err < 0.02, (name, err)
    ids = torch.tensor([tok.bos_token_id] + tok.encode(real_text)[:255])
    ref_model = copy.deepcopy(model)  # the QTensors' own weights, in bf16 nn.Linear: what the format must keep
    for name, q in qt.items():
        ref_model.get_submodule(name).weight.data = dequantize(q).to(torch.bfloat16)
    p_float, p_ref, p_q = _ppl(model, ids), _ppl(ref_model, ids), _ppl(qmodel, ids)
    print(f"{bits}-bit ppl: float {p_float:.3f}, dequantized {p_ref:.3f}, loaded GPTQ checkpoint {p_q:.3f} "
          f"(ratio to float {p_q / p_float:.4f})")
    assert p_q / p_ref < 1.02  # the checkpoint + kernels add ~nothing to the quantization's own loss
    # RTN 4-bit sym g64 itself costs this 135M model ~1.65x perplexity (GPTQ-layout independent); 8-bit ~1.0x
    assert p_q / p_float < (1.10 if bits == 8 else 1.8)


def _tiny_dir(tmp_path, qweight_fn=None, drop=None, act_order=False, bias=False):
    """A 1-layer model whose q_proj is a hand-packed 4-bit v1 GPTQ tensor (asymmetric, zero minus one).
    act_order: g_idx as AutoGPTQ's desc_act writes it (column perm[i] in group i // 32 for a random order perm);
    bias: attention biases, q_proj's as the fp16 `bias` tensor AutoGPTQ's QuantLinear keeps."""
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 64, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                   "sym": False, "checkpoint_format": "gptq"}}
    cfg["quantization_config"]["desc_act"] = act_order
    cfg["attention_bias"] = bias
    g = torch.Generator().manual_seed(0)
    n = k = 64
    u = torch.randint(0, 16, (n, k), generator=g)  # codes [N, K]
    z = torch.randint(0, 16, (n, k // 32), generator=g)  # zero points [N, G], includes 0 (wraps in v1)
    z[0, 0] = 0
    scales = (torch.randint(1, 64, (n, k // 32), generator=g) / 1024.0)  # exact in fp16 and bf16
    g_idx = torch.arange(k) // 32
    if act_order:
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[torch.randperm(k, generator=g)] = torch.arange(k) // 32
    want = ((u - z[:, g_idx]) * scales[:, g_idx]).float()  # W[n, k] = (u - z[g_idx[k]]) * s[g_idx[k]]
    # pack by hand: word i of column n holds codes 8i..8i+7, the lowest nibble first
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        qweight |= u.T[j::8] << (4 * j)
    qzeros = torch.zeros(k // 32, n // 8, dtype=torch.int64)
    zt = ((z - 1) & 15).T  # v1 stores zero - 1, [G, N]
    for j in range(8):
        qzeros |= zt[:, j::8] << (4 * j)
    to32 = lambda t: torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)  # noqa: E731
    state = {"model.layers.0.self_attn.q_proj.qweight": to32(qweight),
             "model.layers.0.self_attn.q_proj.qzeros": to32(qzeros),
             "model.layers.0.self_attn.q_proj.scales": scales.T.contiguous().half(),
             "model.layers.0.self_attn.q_proj.g_idx": g_idx.int()}
    if bias:
        state["model.layers.0.self_attn.q_proj.bias"] = (torch.randint(-64, 64, (n,), generator=g) / 64).half()
        for nm, size in (("k_proj", 32), ("v_proj", 32), ("o_proj", 64)):
            state[f"model.layers.0.self_attn.{nm}.bias"] = torch.randn(size, generator=g).to(torch.bfloat16)
    if qweight_fn:
        state = qweight_fn(state)
    for name in drop or ():
        state.pop(name)
    shapes = {"model.embed_tokens.weight": (32, 64), "lm_head.weight": (32, 64), "model.norm.weight": (64,),
              "model.layers.0.input_layernorm.weight": (64,), "model.layers.0.post_attention_layernorm.weight": (64,),
              "model.layers.0.self_attn.k_proj.weight": (32, 64), "model.layers.0.self_attn.v_proj.weight": (32, 64),
              "model.layers.0.self_attn.o_proj.weight": (64, 64), "model.layers.0.mlp.gate_proj.weight": (128, 64),
              "model.layers.0.mlp.up_proj.weight": (128, 64), "model.layers.0.mlp.down_proj.weight": (64, 128)}
    state.update({nm: torch.randn(s, generator=g).to(torch.bfloat16) for nm, s in shapes.items()})
    if bias:
        want = want, state["model.layers.0.self_attn.q_proj.bias"].float()
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(d / "model.safetensors"))
    return d, want


def test_hand_packed_v1_checkpoint(tmp_path):
    from minicpm4.config import ModelConfig
    from minicpm4.io.loader import build_model
    from minicpm4.quant.gptq_format import gptq_layers
    from minicpm4.weights import read_state_dict
    d, want = _tiny_dir(tmp_path)
    config = ModelConfig.from_json(d / "config.json")
    state = read_state_dict([d / "model.safetensors"], torch.bfloat16)
    layers = gptq_layers(config.extra["quantization_config"], state, str(d))
    model = build_model(config, state, str(d), layers=layers)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Int4Linear)
    eye = torch.eye(64, dtype=torch.bfloat16)
    assert torch.allclose(layer(eye).float().T, want, rtol=1e-2, atol=1e-2)  # bf16 outputs / scale-zero
    from minicpm4.quant.gptq_format import unpack_qtensor  # the codes, zeros and fp16 scales read back exactly
    raw = {k.rpartition(".")[2]: v for k, v in load_file(str(d / "model.safetensors")).items() if "q_proj" in k}
    assert torch.equal(dequantize(unpack_qtensor("q_proj", raw, 4, 32, "gptq", str(d))), want)


@pytest.mark.parametrize("act_order,bias", [(True, False), (False, True), (True, True)])
def test_act_order_and_bias_checkpoint(tmp_path, act_order, bias):
    """desc_act checkpoints (g_idx a permuted grouping) and layers with a bias load through minicpm4.load and
    compute x @ W^T + b with W from the AutoGPTQ formula; the model still runs (on the Python layers)."""
    from minicpm4.config import ModelConfig
    from minicpm4.io.loader import build_model
    from minicpm4.quant.gptq_format import GPTQAdapter, gptq_layers
    from minicpm4.weights import read_state_dict
    d, want = _tiny_dir(tmp_path, act_order=act_order, bias=bias)
    w, b = want if bias else (want, torch.zeros(64))
    config = ModelConfig.from_json(d / "config.json")
    state = read_state_dict([d / "model.safetensors"], torch.float32)
    model = build_model(config, state, str(d), layers=gptq_layers(config.extra["quantization_config"], state, str(d)))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, GPTQAdapter) and isinstance(layer.inner, Int4Linear)
    assert (layer.perm is not None) == act_order
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = x.double() @ w.double().T + b.double()
    tol = 2 ** -7 * (x.double().abs() @ w.double().abs().T + b.double().abs()) + 1e-2
    assert (layer(x).double() - ref).abs().le(tol).all()
    attach(model.to(torch.bfloat16))  # q/k/v do not fuse (different kinds): no C++ stack, still runs
    assert model.native is None
    assert model(torch.tensor([[1, 5, 7]])).isfinite().all()


def test_quantize_config_json_and_marlin(tmp_path):
    """Older AutoGPTQ releases keep the config in quantize_config.json (no quant_method); marlin-packed
    checkpoints use another qweight layout and must be refused, not misread."""
    from minicpm4.quant.gptq_format import gptq_layers, quant_config_of
    d, _ = _tiny_dir(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    qc.pop("quant_method")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "quantize_config.json").write_text(json.dumps(qc))
    found = quant_config_of(d, {})
    assert found["quant_method"] == "gptq" and found["bits"] == 4 and found["group_size"] == 32
    assert quant_config_of(d, {"quantization_config": {"quant_method": "x"}}) == {"quant_method": "x"}
    with pytest.raises(CheckpointError, match="marlin"):
        gptq_layers({**found, "is_marlin_format": True}, {}, str(d))


@pytest.mark.parametrize("case,needle", [
    ("missing_scales", "q_proj.scales"),
    ("bad_shape", "q_proj.qweight"),
])
def test_corrupt_checkpoint(tmp_path, case, needle):
    from minicpm4.config import ModelConfig
    from minicpm4.quant.gptq_format import gptq_layers
    from minicpm4.weights import read_state_dict
    p = "model.layers.0.self_attn.q_proj."
    if case == "missing_scales":
        d, _ = _tiny_dir(tmp_path, drop=[p + "scales"])
    else:  # 5 packed words of 8 codes -> K = 40 inputs, which contradicts group_size 32 and the 64-wide layer
        d, _ = _tiny_dir(tmp_path, qweight_fn=lambda s: {**s, p + "qweight": s[p + "qweight"][:5].contiguous()})
    config = ModelConfig.from_json(d / "config.json")
    state = read_state_dict([d / "model.safetensors"], torch.bfloat16)
    with pytest.raises(CheckpointError, match=needle):
        gptq_layers(config.extra["quantization_config"], state, str(d))


def test_pack_rows_round_trip():
    from minicpm4.quant.gptq_format import unpack_rows
    u = torch.randint(0, 256, (16, 3))
    assert torch.equal(unpack_rows(pack_rows(u, 8), 8), u)
    assert pack_rows(torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]]), 4).item() == \
        torch.tensor(0xF7654321).to(torch.int64).sub(2**32).item()


def test_cli_quantize_and_generate(smollm_gguf, real_text, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(real_text)
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "minicpm4.cli", "quantize", str(smollm_gguf), "--method", "gptq",
                        "--bits", "4", "--group-size", "64", "--calib", str(calib), "--nsamples", "4",
                        "--seq-len", "128", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[1/" in r.stderr and (out / "model.safetensors").is_file()
    r = subprocess.run([sys.executable, "-m", "minicpm4.cli", "generate", "--model", str(out), "--prompt", "hi",
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()
    bad = subprocess.run([sys.executable, "-m", "minicpm4.cli", "quantize", str(smollm_gguf), "--method", "rtn",
                          "--group-size", "256", "-o", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--group-size 64" in bad.stderr
