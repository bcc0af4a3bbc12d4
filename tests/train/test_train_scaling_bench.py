"""ScalingBench-style scoring: answer-only loss masking, batched scoring equal to one-by-one, the sigmoid fit, and
the tunnel report's best rates by predicted accuracy."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from train_util import TINY_MODEL, bench_items, small_tokenizer

from minicpm4.config import ModelConfig, preset
from minicpm4.errors import ConfigError
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.train.linear_cross_entropy import IGNORE
from minicpm4.train.scaling_bench import answer_labels, encode, evaluate, fit_sigmoid, predict, read_items
from minicpm4.train.tunnel import write_report

I = IGNORE
pytestmark = pytest.mark.usefixtures("one_thread")


def test_answer_labels_mask_question_and_padding():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    labels = answer_labels(ids, n_question=torch.tensor([2, 1]), lengths=torch.tensor([5, 3]))
    # row 0: question = tokens 0-1, answer = tokens 2-4, predicted from positions 1-3
    # row 1: question = token 0, answer = tokens 1-2, then padding
    assert labels.tolist() == [[I, 7, 8, 9, I], [6, 7, I, I, I]]


def test_evaluate_equals_unbatched_scoring(tmp_path, real_text):
    tok = small_tokenizer(real_text)
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(ModelConfig.from_dict({**preset("tiny").to_dict(), **TINY_MODEL,
                                                       "vocab_size": tok.vocab_size})).eval()
    items = bench_items(real_text)
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    assert read_items(path) == items
    got = evaluate(model, tok, items, batch=5)  # uneven batches, right padding
    nll = n = correct = 0
    with torch.no_grad():
        for it in items:
            means = []
            for c in it["choices"]:
                ids, nq = encode(tok, it["question"], c)
                logp = F.log_softmax(model(torch.tensor([ids]))[0], -1)
                lp = [logp[t - 1, ids[t]].item() for t in range(nq, len(ids))]  # answer tokens only
                means.append(sum(lp) / len(lp))
                if c == it["answer"]:
                    nll, n = nll - sum(lp), n + len(lp)
            correct += max(range(len(means)), key=means.__getitem__) == it["label"]
    assert got["cond_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["accuracy"] == correct / len(items) and got["items"] == 12
    exact = evaluate(model, tok, [{"question": it["question"], "answer": it["answer"]} for it in items])
    assert exact["cond_loss"] == pytest.approx(got["cond_loss"], rel=1e-5) and exact["accuracy"] == 0.0  # random model


def test_bad_items_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a", "choices": ["b"], "label": 0}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: choices need"):
        read_items(path)


def test_sigmoid_fit_recovers_known_curve():
    truth = {"a": 0.25, "k": 3.0, "l0": 4.0}
    losses = [2.0 + 0.1 * i for i in range(50)]
    exact = fit_sigmoid(losses, [predict(truth, x) for x in losses])
    assert exact["a"] == pytest.approx(0.25, abs=0.01) and exact["k"] == pytest.approx(3.0, rel=0.05)
    assert exact["l0"] == pytest.approx(4.0, abs=0.05) and exact["rmse"] < 2e-3
    gen = torch.Generator().manual_seed(0)
    noisy = [predict(truth, x) + 0.02 * torch.randn(1, generator=gen).item() for x in losses]
    fit = fit_sigmoid(losses, noisy)
    assert fit["l0"] == pytest.approx(4.0, abs=0.2) and fit["a"] == pytest.approx(0.25, abs=0.05)
    assert 0.01 < fit["rmse"] < 0.03  # the noise level
    assert predict(fit, 2.0) > predict(fit, 7.0)  # lower loss, higher accuracy


def test_report_gives_best_rates_by_predicted_accuracy(tmp_path):
    truth = {"a": 0.25, "k": 2.0, "l0": 5.0}
    results = []
    for width, shift in ((64, 0.0), (128, -0.3)):
        # the best training loss is at lr 0.01 for both widths, the best answer loss at 0.02 for width 128
        for lr, loss, bench in ((0.01, 5.0, 5.6), (0.02, 5.1, 5.5 + 0.5 * (width == 64)), (0.04, 5.5, 6.0)):
            results.append({"param": "mup", "width": width, "lr": lr, "loss": loss + shift, "steps": 4,
                            "stopped": False, "curve": [], "bench_loss": bench + shift,
                            "bench_acc": predict(truth, bench + shift)})
    summary = write_report(tmp_path, results, None, with_plot=False)
    sb = summary["scaling_bench"]
    assert sb["fit"]["l0"] == pytest.approx(5.0, abs=0.05) and sb["fit"]["points"] == 6
    assert {w: v["lr"] for w, v in summary["best"]["mup"].items()} == {"64": 0.01, "128": 0.01}
    assert {w: v["lr"] for w, v in sb["best"]["mup"].items()} == {"64": 0.01, "128": 0.02}
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(math.isclose(r["pred_acc"], r["bench_acc"], abs_tol=0.01) for r in rows)


def test_tunnel_cli_rejects_bad_items_before_training(tmp_path):
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"question": "In the beginning"}\n')
    r = subprocess.run([sys.executable, "-m", "minicpm4.cli", "tunnel", "--bench", str(bad), "--set", "data=none",
                        "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"error: {bad}:1: an item needs string fields question and answer" in r.stderr
    assert not (tmp_path / "out").exists()
