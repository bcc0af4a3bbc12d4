"""Plots of runs/tiny_pipeline.sh: the training loss of each stage (from its metrics.jsonl) and the planted-fact
retrieval before and after the long-context stage (runs/planted_facts.py's retrieval.json and retrieval_short.json).

    python runs/pipeline_plots.py OUT      -> OUT/curves.png, OUT/retrieval.png
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = (("pretrain (seq 128, dense)", "pre"), ("long context (seq 1024, InfLLM v2, LongRoPE)", "long/run"),
          ("SFT (chat, assistant tokens)", "sft"))


def smooth(values: list[float], k: int = 10) -> list[float]:
    """Trailing mean over k steps (a batch is a few thousand tokens, so single-step losses are noisy)."""
    return [sum(values[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(values))]


def curves(out: Path) -> None:
    fig, axes = plt.subplots(1, len(STAGES), figsize=(5 * len(STAGES), 3.6))
    for ax, (title, sub) in zip(axes, STAGES):
        path = out / sub / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
            ax.plot(steps, loss, color="0.75", lw=0.8, label="per step")
            ax.plot(steps, smooth(loss), color="C0", label="mean of 10")
            ax.legend()
        ax.set(title=title, xlabel="step", ylabel="training loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


def retrieval(out: Path) -> None:
    """One panel per test set that long_context.sh scored: ~1000-token prompts (retrieval.json) and, when present,
    ~120-token ones (retrieval_short.json, within the pretrained length)."""
    files = [f for f in ("retrieval.json", "retrieval_short.json") if (out / "long" / f).is_file()]
    reports = [json.loads((out / "long" / f).read_text()) for f in files]
    names = list(reports[0]["results"])
    fig, axes = plt.subplots(1, len(reports), figsize=(len(reports) * max(6.0, 2 + 1.6 * len(names)), 3.6),
                             squeeze=False)
    for ax, report in zip(axes[0], reports):
        for i, metric in enumerate(("exact", "tokens")):
            values = [report["results"][n][metric] for n in names]
            label = {"exact": "exact number (greedy)", "tokens": "number tokens right (teacher-forced)"}[metric]
            bars = ax.bar([j + 0.38 * i for j in range(len(names))], values, 0.38, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(0.1, color="0.5", ls=":", lw=1, label="1 in 10")
        lo, hi = report["prompt_tokens"]
        ax.set(xticks=[j + 0.19 for j in range(len(names))], xticklabels=names, ylim=(0, 1.05), ylabel="accuracy",
               title=f"planted facts: {lo}-{hi}-token prompts, {report['results'][names[0]]['tests']} tests")
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=110)


def main() -> None:
    out = Path(sys.argv[1])
    curves(out)
    if (out / "long" / "retrieval.json").is_file():
        retrieval(out)


if __name__ == "__main__":
    main()
