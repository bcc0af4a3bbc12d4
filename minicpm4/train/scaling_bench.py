"""ScalingBench-style evaluation for the tunnel: conditional loss on answer text, mapped to accuracy by a sigmoid.

MiniCPM4's ScalingBench ([TR] pp. 14-15) scores a model by its loss on reasoning + answer given the question, and maps
that loss to downstream accuracy with a sigmoid fitted on models of several sizes. Here, on a JSONL file of items
    {"question": str, "answer": str, "choices": [str, ...] (optional), "label": int (index of answer in choices)}
`evaluate` measures, for one model:
  - cond_loss: mean cross-entropy over the answer's tokens given the question (question tokens carry no loss:
    `answer_labels`), summed over all items and divided by all answer tokens;
  - accuracy: with choices, the share of items whose answer has the highest mean log-likelihood per token among the
    choices (multiple choice by log-likelihood); without, exact match: every answer token is the model's argmax
    given the tokens before it (what greedy decoding would write).
`fit_sigmoid` fits acc = a + (1 - a) / (1 + exp(k (loss - l0))) to (cond_loss, accuracy) pairs of many proxy runs
(a: the floor at high loss, e.g. chance; l0: the loss at the midpoint; k > 0: steepness), and `predict` applies it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from minicpm4.errors import ConfigError
from minicpm4.train.linear_cross_entropy import IGNORE


def read_items(path: str | Path) -> list[dict]:
    """Items of a JSONL file, checked: question and answer strings; choices with a valid label if present."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}:{n}: not a JSON object") from None
        if not (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("answer"), str)):
            raise ConfigError(f"{path}:{n}: an item needs string fields question and answer")
        choices = item.get("choices")
        if choices is not None and not (isinstance(choices, list) and isinstance(item.get("label"), int)
                                        and 0 <= item["label"] < len(choices) and choices[item["label"]] == item["answer"]):
            raise ConfigError(f"{path}:{n}: choices need an int label with choices[label] == answer")
        items.append(item)
    if not items:
        raise ConfigError(f"{path}: no items")
    return items


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """(token ids of question + " " + answer, number of question tokens incl. BOS)."""
    q = tokenizer.encode(question, add_special_tokens=True)
    return q + tokenizer.encode(" " + answer, add_special_tokens=False), len(q)


def answer_labels(ids: torch.Tensor, n_question: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Next-token labels [B, T] of right-padded rows ids [B, T]: labels[:, t] = ids[:, t+1] where token t+1 belongs
    to the answer (n_question <= t+1 < length), IGNORE elsewhere (question tokens and padding carry no loss)."""
    t = ids.shape[1]
    nxt = torch.arange(1, t + 1)[None, :]  # index of the predicted token
    keep = (nxt >= n_question[:, None]) & (nxt < lengths[:, None])
    shifted = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    return torch.where(keep, shifted, IGNORE)


@torch.no_grad()
def score_rows(model, rows: list[tuple[list[int], int]], batch: int = 32) -> list[tuple[float, int, bool]]:
    """Rows (token ids, question tokens) scored in right-padded batches. Per row: (answer log-likelihood
    log p(answer | question) = sum over answer tokens, answer tokens, every answer token is the argmax)."""
    out = []
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        lengths = torch.tensor([len(ids) for ids, _ in part])
        ids = torch.zeros(len(part), int(lengths.max()), dtype=torch.long)
        for i, (row, _) in enumerate(part):
            ids[i, :len(row)] = torch.tensor(row)
        labels = answer_labels(ids, torch.tensor([n for _, n in part]), lengths)
        logits = model(ids)  # [B, T, V] fp32; causal, so right padding changes nothing before it
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # [B, T]
        mask = labels != IGNORE
        hit = (logits.argmax(-1) == labels) | ~mask
        out += [(-nll[i].sum().item(), int(mask[i].sum()), bool(hit[i].all())) for i in range(len(part))]
    return out


def evaluate(model, tokenizer, items: list[dict], batch: int = 32) -> dict:
    """{"cond_loss", "accuracy", "items"} of one model on the items (see the module docstring)."""
    rows, owners = [], []
    for i, item in enumerate(items):
        for c in item.get("choices") or [item["answer"]]:
            rows.append(encode(tokenizer, item["question"], c))
            owners.append(i)
    scores = score_rows(model.eval(), rows, batch)
    per_item: dict[int, list[tuple[float, int, bool]]] = {}
    for i, sc in zip(owners, scores):
        per_item.setdefault(i, []).append(sc)
    nll = tokens = correct = 0
    for i, item in enumerate(items):
        sc = per_item[i]
        gold = sc[item.get("label", 0)] if item.get("choices") else sc[0]
        nll, tokens = nll - gold[0], tokens + gold[1]
        if item.get("choices"):
            best = max(range(len(sc)), key=lambda j: sc[j][0] / max(sc[j][1], 1))
            correct += best == item["label"]
        else:
            correct += gold[2]
    return {"cond_loss": nll / max(tokens, 1), "accuracy": correct / len(items), "items": len(items)}


def predict(fit: dict, loss: float) -> float:
    z = fit["k"] * (loss - fit["l0"])
    return fit["a"] + (1 - fit["a"]) / (1 + math.exp(min(z, 700.0)))


def _curve(loss: torch.Tensor, k: torch.Tensor, l0: torch.Tensor) -> torch.Tensor:
    """s = 1 / (1 + exp(k (loss - l0))) on a grid: k, l0 [G] against loss [N] -> [G, N]."""
    return torch.sigmoid(-k[:, None] * (loss[None, :] - l0[:, None]))


def fit_sigmoid(losses: list[float], accs: list[float], rounds: int = 4) -> dict:
    """Least-squares fit of acc = a + (1 - a) s(loss), s = 1 / (1 + exp(k (loss - l0))): for each (k, l0) on a grid
    the best a is closed-form (acc - s = a (1 - s) is linear in a; clipped to [0, 1)), and the grid is refined
    around the best point `rounds` times. Returns {"a", "k", "l0", "rmse", "points"}."""
    if len(losses) < 3:
        raise ConfigError(f"a sigmoid fit needs at least 3 (loss, accuracy) points, got {len(losses)}")
    x, y = torch.tensor(losses, dtype=torch.float64), torch.tensor(accs, dtype=torch.float64)
    span = float(x.max() - x.min()) or 1.0
    l0_lo, l0_hi = float(x.min()) - span, float(x.max()) + span
    lk_lo, lk_hi = math.log(0.1 / span), math.log(100.0 / span)
    best = None
    for _ in range(rounds):
        l0, lk = torch.meshgrid(torch.linspace(l0_lo, l0_hi, 81, dtype=torch.float64),
                                torch.linspace(lk_lo, lk_hi, 61, dtype=torch.float64), indexing="ij")
        l0, k = l0.flatten(), lk.flatten().exp()
        s = _curve(x, k, l0)  # [G, N]
        u = 1 - s
        a = (((y - s) * u).sum(1) / (u * u).sum(1).clamp(min=1e-12)).clamp(0.0, 1 - 1e-9)
        sse = ((a[:, None] * u + s - y) ** 2).sum(1)
        i = int(sse.argmin())
        best = (float(a[i]), float(k[i]), float(l0[i]), float(sse[i]))
        dl0, dlk = (l0_hi - l0_lo) / 8, (lk_hi - lk_lo) / 8  # zoom: +-10 grid cells around the best
        l0_lo, l0_hi = best[2] - dl0, best[2] + dl0
        lk_lo, lk_hi = math.log(best[1]) - dlk, math.log(best[1]) + dlk
    a, k, l0, sse = best
    return {"a": a, "k": k, "l0": l0, "rmse": math.sqrt(sse / len(losses)), "points": len(losses)}


def plot_fit(points: list[tuple[float, float, str]], fit: dict, path: Path):
    """Accuracy vs conditional loss, one marker per (loss, acc, label) point, and the fitted sigmoid; None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for label in sorted({p[2] for p in points}):
        sel = [p for p in points if p[2] == label]
        ax.plot([p[0] for p in sel], [p[1] for p in sel], "o", label=label, alpha=0.7)
    lo, hi = min(p[0] for p in points), max(p[0] for p in points)
    xs = [lo + (hi - lo) * i / 100 for i in range(101)]
    ax.plot(xs, [predict(fit, v) for v in xs], "k-",
            label=f"a={fit['a']:.3f} k={fit['k']:.2f} l0={fit['l0']:.2f}")
    ax.set(xlabel="conditional loss on answers (nats/token)", ylabel="accuracy", title="ScalingBench-style fit")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
