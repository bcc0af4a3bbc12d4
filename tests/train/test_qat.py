"""QAT (minicpm4/train/qat.py): the straight-through estimator's gradients, fake-quantized forward = dequantized
weights, a few ternary QAT steps lower the held-out loss of a tiny model, resume after an interruption, and
`minicpm4 train qat` exporting a packed ternary checkpoint that loads."""

import json
import subprocess
import sys

import pytest
import torch

import minicpm4
from minicpm4.config import tiny
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.quant.primitives import dequantize, quantize_int, quantize_ternary
from minicpm4.quant.ternary import TernaryLinear
from minicpm4.train.qat import QATConfig, attach, loss_on, lr_at, remove, train


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = tiny()
    cfg.scale_emb = 1.0  # keep the untrained logits small
    return MiniCPM4ForCausalLM(cfg)


def patterned_tokens(n, vocab=512, seed=0):
    """A learnable stream: short random 'words' (fixed token runs) in random order."""
    g = torch.Generator().manual_seed(seed)
    words = [torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g) for _ in range(40)]
    out = []
    while len(out) < n:
        out.extend(words[int(torch.randint(0, 40, (1,), generator=g))].tolist())
    return torch.tensor(out[:n])


@pytest.mark.parametrize("mode", ["ternary", "int4"])
def test_ste_gradient_is_the_gradient_at_the_quantized_weight(mode):
    model = tiny_model()
    ids = patterned_tokens(2 * 32).view(2, 32)
    # reference: the float model with each linear's weight replaced by its quantized value, as a leaf
    ref = tiny_model()
    qfn = (lambda w: dequantize(quantize_ternary(w, 32))) if mode == "ternary" else \
        (lambda w: dequantize(quantize_int(w, 4, 128, True)))
    names = attach(model, mode, 128)
    assert len(names) == 2 * 7
    for name in names:
        ref.get_submodule(name).weight.data = qfn(ref.get_submodule(name).weight.data)
    loss = loss_on(model, ids)
    loss_ref = loss_on(ref, ids)
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    loss.backward()
    loss_ref.backward()
    for name in names:
        g = model.get_submodule(name).parametrizations.weight.original.grad
        g_ref = ref.get_submodule(name).weight.grad
        assert g is not None and g.abs().sum() > 0, name
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-7), name
    remove(model)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_learning_rate_rewarms_then_decays():
    cfg = QATConfig(steps=100, lr=1e-2, warmup=10, decay_frac=0.2, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10:80] == [1e-2] * 70
    assert lrs[99] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_few_ternary_qat_steps_lower_the_held_out_loss(tmp_path):
    model = tiny_model()
    tokens = patterned_tokens(6000)
    cfg = QATConfig(mode="ternary", steps=30, lr=1e-2, warmup=3, batch=8, seq_len=32, eval_every=30,
                    eval_batches=4)
    history = train(model, tokens[:5000], tokens[5000:], cfg)
    before, after = history[0]["eval_loss"], history[-1]["eval_loss"]
    print(f"held-out loss: float {history[0]['float_eval_loss']:.3f}, ternary before QAT {before:.3f}, "
          f"after 30 QAT steps {after:.3f}")
    assert after < before - 1.0


def test_interrupted_run_resumes(tmp_path):
    tokens = patterned_tokens(3000)
    cfg = QATConfig(mode="ternary", steps=8, warmup=2, batch=2, seq_len=16, eval_every=8, save_every=4,
                    eval_batches=1)
    state = tmp_path / "state.pt"

    def stop_at_end(msg):
        if msg.startswith("step 8/8"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), tokens[:2500], tokens[2500:], cfg, state, log=stop_at_end)
    assert torch.load(state, weights_only=False)["step"] == 4
    logs = []
    history = train(tiny_model(seed=1), tokens[:2500], tokens[2500:], cfg, state, log=logs.append)
    assert logs[0] == f"resumed at step 4 from {state}"
    assert [h["step"] for h in history] == list(range(9))


def test_cli_train_qat_exports_packed_ternary(tmp_path):
    from minicpm4.io.loader import default_model_dir, save_pretrained
    from minicpm4.text.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(default_model_dir())
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    save_pretrained(MiniCPM4ForCausalLM(cfg), tok, tmp_path / "float")
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 150)
    out = tmp_path / "qat"
    r = subprocess.run([sys.executable, "-m", "minicpm4.cli", "train", "qat", str(tmp_path / "float"), "--text",
                        str(text), "--steps", "4", "--warmup", "1", "--batch", "2", "--seq-len", "32",
                        "--eval-every", "2", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    hist = json.loads((out / "qat_history.json").read_text())["history"]
    assert [h["step"] for h in hist] == [0, 1, 2, 3, 4] and "float_eval_loss" in hist[0]
    model, _ = minicpm4.load(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, TernaryLinear)
    assert not (tmp_path / "qat.qat-state.pt").exists()
