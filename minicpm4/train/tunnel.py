"""ModelTunnel-style hyper-parameter search on muP proxies (`minicpm4 tunnel`), small-scale.

For each parametrisation (mup, sp) and each proxy width, the learning rates are tried in increasing order with
the base TrainConfig (same data, steps, schedule); the model is `base.model` with hidden_size = width, the
intermediate size and head count scaled with it (head_dim and GQA group fixed). muP sets dim_model_base to the
smallest width (so the width multiplier m = width / smallest, mup.py scales init and rates, the model divides
logits by m); sp ("standard parametrisation") sets dim_model_base = width (no logit divisor) and mup=False (one
rate and init for every matrix), the baseline that muP should beat: its best rate drifts with width.

Early stopping: once a run is `grace` of the way through, it stops as soon as its loss is not finite or exceeds
the best finished run of the same width at the same step by `margin` nats (it cannot become the best).
A run's score is the mean of its last `tail` logged losses (training loss on unseen windows: the data is not
repeated in these short runs). The coordinate check records each decoder layer's output RMS after a few steps at
one rate: under muP it stays flat across widths, under sp it grows with width.

ScalingBench-style scoring (scaling_bench.py), with `bench` items: every finished run's final model gets the
conditional loss on the items' answers and its accuracy on them; a sigmoid fitted to all runs' (loss, accuracy)
pairs maps each run's conditional loss to a predicted accuracy, and the report gives the best rate per width by
training loss and by that predicted accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from minicpm4.config import PRESETS, ModelConfig, preset
from minicpm4.errors import ConfigError
from minicpm4.fileio import atomic_write_text
from minicpm4.io.loader import load
from minicpm4.train.metrics import read_metrics
from minicpm4.train.scaling_bench import evaluate, fit_sigmoid, plot_fit, predict
from minicpm4.train.token_loader import PackedLoader, TokenShards
from minicpm4.train.train_config import TrainConfig
from minicpm4.train.trainer import train

PARAMETRISATIONS = ("mup", "sp")


def proxy_overrides(base: TrainConfig, width: int, smallest: int, param: str) -> dict:
    """model_overrides for a proxy of `width`, scaled from the base model's shape."""
    if base.model not in PRESETS:
        raise ConfigError(f"tunnel builds proxies from a preset model (known: {', '.join(PRESETS)}), got {base.model!r}")
    mc = ModelConfig.from_dict({**preset(base.model).to_dict(), **base.model_overrides})
    head_dim, group = mc.head_dim, mc.num_attention_heads // mc.num_key_value_heads
    if width % (head_dim * group):
        raise ConfigError(f"width {width} must be a multiple of head_dim x GQA group = {head_dim * group}")
    heads = width // head_dim
    return {**base.model_overrides, "hidden_size": width, "num_attention_heads": heads,
            "num_key_value_heads": heads // group, "head_dim": head_dim,
            "intermediate_size": width * mc.intermediate_size // mc.hidden_size,
            "dim_model_base": smallest if param == "mup" else width}


def proxy_config(base: TrainConfig, width: int, smallest: int, param: str, lr: float, out: Path) -> TrainConfig:
    return dataclasses.replace(base, out_dir=str(out), lr=lr, mup=param == "mup",
                               model_overrides=proxy_overrides(base, width, smallest, param))


def sweep(base: TrainConfig, widths: list[int], lrs: list[float], params=PARAMETRISATIONS, margin: float = 0.5,
          grace: float = 0.3, tail: int = 5, work: Path | None = None, log: Callable[[str], None] | None = None,
          bench: list[dict] | None = None):
    """Every (parametrisation, width, lr) run: a list of {param, width, lr, loss, steps, stopped, curve}, plus
    bench_loss and bench_acc for finished runs when `bench` items are given."""
    work = Path(work or tempfile.mkdtemp(prefix="tunnel."))
    results = []
    for param in params:
        for width in widths:
            best: list[float] | None = None
            for lr in sorted(lrs):
                out = work / f"{param}_w{width}_lr{lr:g}"
                shutil.rmtree(out, ignore_errors=True)  # scratch: a rerun of the sweep starts each proxy afresh

                def hopeless(rec: dict, best=best) -> bool:
                    if not math.isfinite(rec["loss"]):
                        return True
                    step = rec["step"]
                    return (best is not None and step >= grace * base.steps and step <= len(best)
                            and rec["loss"] > best[step - 1] + margin)

                result = train(proxy_config(base, width, min(widths), param, lr, out), on_step=hopeless)
                curve = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
                finished = result["step"] == base.steps and all(math.isfinite(x) for x in curve)
                score = sum(curve[-tail:]) / len(curve[-tail:]) if finished else float("inf")
                if finished and (best is None or score < sum(best[-tail:]) / len(best[-tail:])):
                    best = curve
                results.append({"param": param, "width": width, "lr": lr, "loss": score, "steps": result["step"],
                                "stopped": not finished, "curve": curve})
                if bench and finished:
                    results[-1].update(bench_scores(result["checkpoint"] / "model", bench))
                if log:
                    log(f"{param} width {width} lr {lr:g}: " + (f"loss {score:.4f}" if finished else
                                                               f"stopped early at step {result['step']}")
                        + (f", bench loss {results[-1]['bench_loss']:.4f} acc {results[-1]['bench_acc']:.3f}"
                           if "bench_loss" in results[-1] else ""))
    return results


def bench_scores(model_dir: Path, items: list[dict]) -> dict:
    """{"bench_loss", "bench_acc"} of a checkpoint's model on ScalingBench-style items."""
    model, tokenizer = load(model_dir, dtype="fp32")
    r = evaluate(model, tokenizer, items)
    return {"bench_loss": r["cond_loss"], "bench_acc": r["accuracy"]}


def scaling_bench(results: list[dict]) -> dict | None:
    """Fit the loss -> accuracy sigmoid on every scored run, add pred_acc to each, and pick per parametrisation and
    width the rate with the best predicted accuracy: {"fit", "best": {param: {width: {lr, bench_loss, ...}}}}."""
    scored = [r for r in results if "bench_loss" in r]
    if len(scored) < 3:
        return None
    fit = fit_sigmoid([r["bench_loss"] for r in scored], [r["bench_acc"] for r in scored])
    best: dict[str, dict[int, dict]] = {}
    for r in scored:
        r["pred_acc"] = predict(fit, r["bench_loss"])
        cur = best.setdefault(r["param"], {}).get(r["width"])
        if cur is None or r["pred_acc"] > cur["pred_acc"]:
            best[r["param"]][r["width"]] = {k: r[k] for k in ("lr", "bench_loss", "bench_acc", "pred_acc")}
    return {"fit": fit, "best": best}


def best_rates(results: list[dict]) -> dict[str, dict[int, dict]]:
    """{param: {width: {"lr", "loss"}}}: the best finished run per parametrisation and width."""
    best: dict[str, dict[int, dict]] = {}
    for r in results:
        cur = best.setdefault(r["param"], {}).get(r["width"])
        if math.isfinite(r["loss"]) and (cur is None or r["loss"] < cur["loss"]):
            best[r["param"]][r["width"]] = {"lr": r["lr"], "loss": r["loss"]}
    return best


def drift(best: dict[int, dict]) -> float:
    """max best lr / min best lr across widths (1 = the optimum did not move)."""
    rates = [v["lr"] for v in best.values()]
    return max(rates) / min(rates) if rates else float("nan")


def coordinate_check(base: TrainConfig, widths: list[int], lr: float, steps: int, params=PARAMETRISATIONS,
                     work: Path | None = None) -> dict[str, dict[int, list[float]]]:
    """{param: {width: per-layer output RMS}} after `steps` steps at rate `lr`, on one training batch."""
    work = Path(work or tempfile.mkdtemp(prefix="coord."))
    batch = PackedLoader(TokenShards(base.data), base.seq_len, base.micro_batch_size, base.seed).next_batch()
    out: dict[str, dict[int, list[float]]] = {}
    for param in params:
        for width in widths:
            shutil.rmtree(work / f"{param}_{width}", ignore_errors=True)
            cfg = dataclasses.replace(proxy_config(base, width, min(widths), param, lr, work / f"{param}_{width}"),
                                      steps=steps, warmup_steps=min(base.warmup_steps, steps), decay_steps=0)
            result = train(cfg)
            model, _ = load(result["checkpoint"] / "model", dtype="fp32")
            rms: list[float] = []
            hooks = [layer.register_forward_hook(lambda m, a, o: rms.append(o.pow(2).mean().sqrt().item()))
                     for layer in model.model.layers]
            with torch.no_grad():
                model(batch["input_ids"])
            for h in hooks:
                h.remove()
            out.setdefault(param, {})[width] = rms
    return out


def plot(results: list[dict], coord: dict | None, path: Path) -> Path | None:
    """loss vs lr per width (one panel per parametrisation) and the coordinate check; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    params = sorted({r["param"] for r in results})
    fig, axes = plt.subplots(1, len(params) + (1 if coord else 0), figsize=(5 * (len(params) + 1), 4), squeeze=False)
    for ax, param in zip(axes[0], params):
        for width in sorted({r["width"] for r in results if r["param"] == param}):
            rows = [r for r in results if r["param"] == param and r["width"] == width and math.isfinite(r["loss"])]
            ax.plot([r["lr"] for r in rows], [r["loss"] for r in rows], "o-", label=f"width {width}")
        ax.set(xscale="log", xlabel="learning rate", ylabel="final loss", title=param)
        ax.legend()
    if coord:
        ax = axes[0][-1]
        for param, by_width in coord.items():
            widths = sorted(by_width)
            ax.plot(widths, [by_width[w][-1] for w in widths], "o-", label=f"{param}: last layer output RMS")
        ax.set(xscale="log", yscale="log", xlabel="width", title="coordinate check")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, results: list[dict], coord: dict | None, with_plot: bool = True) -> dict:
    """results.jsonl, summary.json (best rate per width, drift; ScalingBench fit and best rates when the runs were
    scored) and the plots tunnel.png (+ scaling_bench.png) into out; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    bench = scaling_bench(results)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    best = best_rates(results)
    summary = {"best": {p: {str(w): v for w, v in b.items()} for p, b in best.items()},
               "lr_drift": {p: drift(b) for p, b in best.items()}, "coordinate_check": coord}
    if bench:
        summary["scaling_bench"] = {"fit": bench["fit"],
                                    "best": {p: {str(w): v for w, v in b.items()} for p, b in bench["best"].items()},
                                    "lr_drift": {p: drift(b) for p, b in bench["best"].items()}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    summary["plot"] = str(plot(results, coord, out / "tunnel.png")) if with_plot else None
    if bench and with_plot:
        points = [(r["bench_loss"], r["bench_acc"], f"{r['param']} w{r['width']}") for r in results if "bench_loss" in r]
        summary["bench_plot"] = str(plot_fit(points, bench["fit"], out / "scaling_bench.png"))
    return summary
