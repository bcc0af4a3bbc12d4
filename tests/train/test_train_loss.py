"""The chunked head + cross-entropy (fast path) against the plain logits + F.cross_entropy reference."""

import pytest
import torch
from train_util import make_shards, small_tokenizer, tiny_config

from minicpm4.train.linear_cross_entropy import IGNORE, linear_cross_entropy, reference_loss
from minicpm4.train.metrics import read_metrics
from minicpm4.train.trainer import train


def both(dtype, chunk):
    torch.manual_seed(0)
    h0, w0 = torch.randn(2, 37, 48), torch.randn(301, 48) * 0.3
    labels = torch.randint(0, 301, (2, 37))
    labels[0, :5] = IGNORE
    labels[1, -1] = IGNORE
    out = []
    for fn, kw in ((reference_loss, {}), (linear_cross_entropy, {"chunk": chunk})):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = fn(h, w, labels, **kw)
        (loss * 0.5).backward()  # a non-unit incoming gradient
        out.append((loss.detach(), h.grad, w.grad))
    return out


@pytest.mark.parametrize("chunk", [8, 128])
def test_fp32_matches_reference(chunk):
    (l0, h0, w0), (l1, h1, w1) = both(torch.float32, chunk)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_reference():
    (l0, h0, w0), (l1, h1, w1) = both(torch.bfloat16, 16)
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-3)  # the same bf16 logits, fp32 softmax in both
    torch.testing.assert_close(h1, h0, rtol=2e-2, atol=2e-3)  # grads differ by bf16 rounding of dlogits
    torch.testing.assert_close(w1, w0, rtol=2e-2, atol=2e-3)
    print("max |dh| diff", (h1 - h0).abs().max().item(), "max |dW| diff", (w1 - w0).abs().max().item())


def test_training_with_fused_loss_follows_the_plain_loss(tmp_path, real_text):
    shards = make_shards(tmp_path, real_text, small_tokenizer(real_text))
    kw = dict(steps=4, warmup_steps=1, decay_steps=1)
    train(tiny_config(shards, tmp_path / "fused", fused_loss=True, **kw))
    train(tiny_config(shards, tmp_path / "plain", fused_loss=False, **kw))
    fused, plain = ([m["loss"] for m in read_metrics(tmp_path / r / "metrics.jsonl")] for r in ("fused", "plain"))
    assert fused == pytest.approx(plain, abs=1e-5) and fused[0] != fused[-1]
