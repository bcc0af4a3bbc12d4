"""The summary of a verification: paired differences over seeds with a Student-t interval, and its table.

For metric m and seeds i = 1..n, d_i = m(candidate arm, seed i) - m(baseline arm, seed i);
    mean = sum d_i / n,   se = sd(d) / sqrt(n)  (sd with n - 1),   95% interval = mean ± t_{0.975, n-1} * se.
"significant" means that interval excludes 0. Pairing by seed removes the data-order noise both arms share.
"""

from __future__ import annotations

import math

METRICS = (("heldout_loss", "lower"), ("mc_accuracy", "higher"), ("mc_margin", "higher"))
ARMS = ("baseline", "candidate")
# Student t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95% interval)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    z = 1.959964
    return T975[df - 1] if df <= len(T975) else z + (z ** 3 + z) / (4 * df)


def summarize(runs: dict) -> dict:
    """Per metric: paired differences candidate - baseline over finished seeds, mean, std error, 95% t interval."""
    done = [r for r in runs.values() if all(a in r for a in ARMS)]
    summary = {}
    for metric, better in METRICS:
        d = [r["candidate"][metric] - r["baseline"][metric] for r in done]
        n = len(d)
        entry = {"better": better, "seeds": n,
                 "baseline": sum(r["baseline"][metric] for r in done) / n if n else None,
                 "candidate": sum(r["candidate"][metric] for r in done) / n if n else None,
                 "diff": sum(d) / n if n else None, "se": None, "ci95": None, "significant": None}
        if n >= 2:
            sd = math.sqrt(sum((x - entry["diff"]) ** 2 for x in d) / (n - 1))
            entry["se"] = sd / math.sqrt(n)
            half = t_quantile(n - 1) * entry["se"]
            entry["ci95"] = [entry["diff"] - half, entry["diff"] + half]
            entry["significant"] = entry["ci95"][0] > 0 or entry["ci95"][1] < 0
        summary[metric] = entry
    return summary


def format_table(results: dict) -> str:
    """The summary as a fixed-width table (diff = candidate - baseline, mean over seeds ± std error)."""
    base = results.get("base_eval", {})
    lines = [f"{'metric':<14}{'base':>9}{'baseline':>10}{'candidate':>10}{'diff':>10}{'± se':>9}  95% CI   (better)"]
    for metric, entry in results["summary"].items():
        def f(x, w):
            return f"{x:>{w}.4f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"
        ci = "[{:+.4f}, {:+.4f}]".format(*entry["ci95"]) if entry["ci95"] else "-"
        flag = " *" if entry["significant"] else ""
        lines.append(f"{metric:<14}{f(base.get(metric), 9)}{f(entry['baseline'], 10)}{f(entry['candidate'], 10)}"
                     f"{f(entry['diff'], 10)}{f(entry['se'], 9)}  {ci} ({entry['better']}){flag}")
    n = max((e["seeds"] for e in results["summary"].values()), default=0)
    lines.append(f"{n} seed(s); * = the 95% interval excludes 0")
    return "\n".join(lines)
