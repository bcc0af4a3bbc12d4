"""The C++ decode stack (model/native_stack.py, csrc/decode_stack.h) against the Python layers of model/decoder.py.

Both run bf16 with fp32 math inside norms, rotary and softmax, but attention and the quantized products sum in
different orders (our kernels against SDPA and torch's), so they are not bit-identical. The honest comparison is against the truth both approximate:
the fp32 model. The native path must be as close to it as the Python path is."""

import copy

import torch

import minicpm4
from minicpm4.config import tiny
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.model.kv_cache import KVCache
from minicpm4.model.native_stack import attach


def _decode_logits(model, ids: torch.Tensor, steps: int, dtype) -> torch.Tensor:
    """Teacher-forced decode of a batch of 2 rows at different lengths (row 1 is 5 tokens behind, so the
    masked path runs): prefill ids[:, :n], then one token per row per step. -> logits [2, steps, V]."""
    n = ids.shape[1] - steps
    cache = KVCache(model.config, 2, ids.shape[1], dtype=dtype)
    out = []
    with torch.no_grad():
        model(ids[:, :n], cache=cache)
        for s in range(steps):
            pos = torch.tensor([[n + s], [n + s - 5]])
            tok = torch.stack([ids[0, n + s], ids[1, n + s - 5]])[:, None]
            out.append(model(tok, positions=pos, cache=cache)[:, -1])
    return torch.stack(out, 1)


def test_native_decode_is_as_accurate_as_the_python_layers(smollm_gguf, real_text):
    m32, tok = minicpm4.load(smollm_gguf, dtype="fp32")
    ids = torch.tensor([tok.encode(real_text)[:80], tok.encode(real_text)[200:280]])
    truth = _decode_logits(m32, ids, 12, torch.float32)
    m, _ = minicpm4.load(smollm_gguf, dtype="bf16")
    attach(m)
    assert m.native is not None, "the C++ decode stack did not build (needs a C++ compiler and ninja)"
    native = _decode_logits(m, ids, 12, torch.bfloat16)
    m.native = None
    python = _decode_logits(m, ids, 12, torch.bfloat16)
    err_native, err_python = (native - truth).abs().mean(), (python - truth).abs().mean()
    assert err_native <= 1.25 * err_python, (err_native, err_python)
    assert (native - python).abs().mean() <= 1.5 * err_python
    assert (native.argmax(-1) == truth.argmax(-1)).float().mean() >= (python.argmax(-1) == truth.argmax(-1)).float().mean() - 0.1


def test_native_decode_runs_int4_and_int8_layers(smollm_gguf, real_text):
    m, tok = minicpm4.load(smollm_gguf, dtype="bf16", int4=True)  # Int4Linear layers, Int8Linear head
    attach(m)
    assert m.native is not None
    ids = torch.tensor([tok.encode(real_text)[:40], tok.encode(real_text)[100:140]])
    native = _decode_logits(m, ids, 6, torch.bfloat16)
    m.native = None
    python = _decode_logits(m, ids, 6, torch.bfloat16)
    assert (native.argmax(-1) == python.argmax(-1)).float().mean() >= 0.9
    assert (native - python).abs().mean() < 0.1 * python.abs().mean()


def test_native_decode_with_mup_multipliers_and_fallbacks(tier, monkeypatch):
    """The tiny MiniCPM4 config (scale_emb 12, residual scale 1.4/sqrt(2), GQA group 4, head_dim 16): the
    residual scaling that the default (Llama) model never exercises. Off switch and unfit models fall back. Runs
    every instruction-set tier (tests/conftest.py's `tier`): norms, SiLU and attention have a path per tier."""
    torch.manual_seed(0)
    m32 = MiniCPM4ForCausalLM(tiny()).eval()
    assert attach(m32).native is None  # fp32 weights: the Python layers run
    m32 = MiniCPM4ForCausalLM(tiny()).eval()
    m = copy.deepcopy(m32).to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 40))
    truth = _decode_logits(m32, ids, 10, torch.float32)
    attach(m)
    assert m.native is not None
    native = _decode_logits(m, ids, 10, torch.bfloat16)
    m.native = None
    python = _decode_logits(m, ids, 10, torch.bfloat16)
    assert (native - truth).abs().mean() <= 1.25 * (python - truth).abs().mean()
    monkeypatch.setenv("MINICPM4_NATIVE", "0")
    assert attach(m).native is None


def test_native_decode_runs_ternary_layers(tier):
    """Every projection a TernaryLinear (the tiny muP config): the C++ stack calls the same gemv TernaryLinear
    does, so native and Python decode agree to bf16 summation-order noise."""
    from minicpm4.quant.ternary import TernaryLinear
    from minicpm4.quant.ternary_format import ternarize

    torch.manual_seed(0)
    m = MiniCPM4ForCausalLM(tiny()).eval()
    layers = ternarize(m)
    m.to(torch.bfloat16)  # before the swap: .to() would cast the layers' fp32 row scales too
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, layer)
    attach(m)
    assert m.native is not None and isinstance(m.model.layers[0].mlp.gate_up_proj, TernaryLinear)
    ids = torch.randint(0, 512, (2, 30))
    native = _decode_logits(m, ids, 8, torch.bfloat16)
    m.native = None
    python = _decode_logits(m, ids, 8, torch.bfloat16)
    assert (native - python).abs().mean() < 0.02 * python.abs().mean()
    assert (native.argmax(-1) == python.argmax(-1)).float().mean() >= 0.9


def test_native_prefill_chunks_are_as_accurate_as_the_python_layers(smollm_gguf, real_text):
    """Prefill through the C++ stack: a first chunk (causal from 0), a second chunk after it (causal by slot, no
    mask tensor), and two rows at different positions (explicit mask); logits of every prompt token against the
    fp32 model's, as close as the Python layers'."""
    m32, tok = minicpm4.load(smollm_gguf, dtype="fp32")
    ids = torch.tensor([tok.encode(real_text)[:96], tok.encode(real_text)[300:396]])
    m, _ = minicpm4.load(smollm_gguf, dtype="bf16")
    attach(m)
    assert m.native is not None

    def prefill(model, dtype):
        cache = KVCache(model.config, 2, 96, dtype=dtype)
        with torch.no_grad():
            a = model(ids[:, :40], cache=cache)
            b = model(ids[:, 40:80], positions=torch.arange(40, 80).expand(2, 40), cache=cache)
            pos = torch.stack([torch.arange(80, 96), torch.arange(78, 94)])  # row 1 rewrites two of its slots
            c = model(torch.stack([ids[0, 80:96], ids[1, 78:94]]), positions=pos, cache=cache)
        return torch.cat([a, b, c], 1)

    truth = prefill(m32, torch.float32)
    native = prefill(m, torch.bfloat16)
    stack, m.native = m.native, None
    python = prefill(m, torch.bfloat16)
    m.native = stack
    assert not torch.equal(native, python)  # the stack ran (it sums in another order)
    err_native, err_python = (native - truth).abs().mean(), (python - truth).abs().mean()
    assert err_native <= 1.25 * err_python, (err_native, err_python)
    assert (native.argmax(-1) == truth.argmax(-1)).float().mean() >= (python.argmax(-1) == truth.argmax(-1)).float().mean() - 0.05


def test_native_prefill_with_sdpa_for_groups_our_attention_does_not_take():
    """GQA groups over 16 heads go to SDPA inside the stack, which needs the causal mask built from the slots."""
    import dataclasses
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(), num_attention_heads=17, num_key_value_heads=1)
    m32 = MiniCPM4ForCausalLM(cfg).eval()
    m = attach(copy.deepcopy(m32).to(torch.bfloat16))
    assert m.native is not None
    ids = torch.randint(0, 512, (1, 48))

    def prefill(model, dtype):
        cache = KVCache(cfg, 1, 48, dtype=dtype)
        with torch.no_grad():
            return torch.cat([model(ids[:, :24], cache=cache),
                              model(ids[:, 24:], positions=torch.arange(24, 48)[None], cache=cache)], 1)

    truth, native = prefill(m32, torch.float32), prefill(m, torch.bfloat16)
    m.native = None
    python = prefill(m, torch.bfloat16)
    assert (native - truth).abs().mean() <= 1.25 * (python - truth).abs().mean()
