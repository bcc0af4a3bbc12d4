"""QAT (minicpm4/train/qat.py, an objective of the one loop; quant/fake_quant.py): the straight-through estimator's
gradients, fake-quantized forward = dequantized weights, the qat task's schedule, a few ternary QAT steps lower the
held-out loss of a tiny model, a crashed run resumes to the weights of an uninterrupted one, and `minicpm4 train qat`
(old flags, and --config/--set with --stop-after then a rerun) exporting a checkpoint that loads."""

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
from minicpm4.quant.fake_quant import attach, remove
from minicpm4.train.metrics import read_metrics
from minicpm4.train.qat import QAT, loss_on
from minicpm4.train.train_config import TrainConfig
from minicpm4.train.trainer import lr_factor, train


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


def qat_config(tmp_path, **kw):
    return TrainConfig.for_task("qat", out_dir=str(tmp_path / "qat"), threads=1, **kw)


def run(cfg, model, tokens, log=None, stop_after=None):
    """QAT of an in-memory model on tokens[:n - 500] (held out: the rest); returns the metrics records."""
    objective = QAT(cfg, model, None, tokens[:-500], tokens[-500:])
    train(cfg, resume=str(objective.run_dir) if (objective.run_dir / "checkpoints").is_dir() else None,
          stop_after=stop_after, log=log, objective=objective)
    return read_metrics(objective.run_dir / "metrics.jsonl")


def test_learning_rate_rewarms_then_decays(tmp_path):
    cfg = qat_config(tmp_path, steps=100, lr=1e-2, warmup_steps=10)  # the qat task: decay over the last 20%, to 0.1
    assert (cfg.decay_steps, cfg.decay_shape, cfg.min_lr_ratio) == (20, "linear", 0.1)
    lrs = [cfg.lr * lr_factor(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10:80] == [1e-2] * 70
    assert lrs[99] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_few_ternary_qat_steps_lower_the_held_out_loss(tmp_path):
    cfg = qat_config(tmp_path, steps=30, lr=1e-2, warmup_steps=3, batch_size=8, seq_len=32, eval_every=30,
                     qat={"eval_batches": 4})
    history = run(cfg, tiny_model(), patterned_tokens(5500))
    before, after = history[0]["eval_loss"], history[-1]["eval_loss"]
    print(f"held-out loss: float {history[0]['float_eval_loss']:.3f}, ternary before QAT {before:.3f}, "
          f"after 30 QAT steps {after:.3f}")
    assert after < before - 1.0


def test_crashed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    tokens = patterned_tokens(3000)
    kw = dict(steps=8, warmup_steps=2, batch_size=2, seq_len=16, eval_every=8, save_every=4, qat={"eval_batches": 1})
    straight = tiny_model()
    full = run(qat_config(tmp_path / "a", **kw), straight, tokens)

    def crash_at_end(msg):
        if msg.startswith("step 8/8"):
            raise KeyboardInterrupt

    cfg = qat_config(tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tiny_model(), tokens, log=crash_at_end)
    run_dir = tmp_path / "b" / "qat.qat-run"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    logs = []
    resumed = tiny_model(seed=1)  # the weights must come from the checkpoint
    history = run(cfg, resumed, tokens, log=logs.append)
    assert logs[0] == f"resumed at step 4 from {run_dir / 'checkpoints' / 'step_0000004'}"
    assert [h["step"] for h in history] == list(range(9))
    assert [h["loss"] for h in history[1:]] == [h["loss"] for h in full[1:]]  # the same batches after the resume
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
    assert not (tmp_path / "qat.qat-state.pt").exists() and not (tmp_path / "qat.qat-run").exists()


def test_cli_train_qat_takes_the_train_config_and_resumes(tmp_path, real_text):
    """--config/--set like pretrain (int4 through qat.mode), --stop-after, then the same command finishes the run."""
    from train_util import small_tokenizer

    from minicpm4.io.loader import save_pretrained
    from minicpm4.quant.int4 import Int4Linear
    tok = small_tokenizer(real_text)  # a small vocabulary keeps the two runs cheap
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    save_pretrained(MiniCPM4ForCausalLM(cfg), tok, tmp_path / "float")
    text = tmp_path / "text.txt"
    text.write_text(real_text[:12000])
    conf = tmp_path / "qat.toml"
    conf.write_text(f'model = "{tmp_path / "float"}"\ndata = "{text}"\nout_dir = "{tmp_path / "q4"}"\nsteps = 4\n'
                    'warmup_steps = 1\nbatch_size = 2\nseq_len = 32\neval_every = 2\n[qat]\ngroup_size = 64\n')
    cmd = [sys.executable, "-m", "minicpm4.cli", "train", "qat", "--config", str(conf), "--set", "qat.mode=int4"]
    r = subprocess.run(cmd + ["--stop-after", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 2 and not (tmp_path / "q4").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed at step 2" in r.stderr and r.stdout.strip() == str(tmp_path / "q4")
    saved = json.loads((tmp_path / "q4" / "qat_history.json").read_text())
    assert [h["step"] for h in saved["history"]] == [0, 1, 2, 3, 4]
    assert saved["config"]["qat"] == {"mode": "int4", "group_size": 64, "eval_batches": 8}
    model, _ = minicpm4.load(tmp_path / "q4")
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)
