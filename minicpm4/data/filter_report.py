"""A filtering job's counts, merged from every task's datatrove stats file.

datatrove saves one stats file per finished task (`logs/<stage>/stats/<rank>.json`: a list of steps,
each `{"name", "stats": {label: total | {"total": ...}}}`). Summing those, rather than reading the
executor's stats.json, counts the tasks finished before an interruption too. The summary says how many
documents were read, how many records were unusable and why, how many each filter dropped and why, and
how many were kept.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

STAGE_ORDER = ("filter", "dedup_signature", "dedup_find", "dedup_buckets", "dedup_cluster", "dedup")


def stage_counts(stage_dir: Path) -> list[tuple[str, Counter]]:
    """[(step name, Counter(label -> total))] summed over the stage's finished tasks."""
    steps: list[tuple[str, Counter]] = []
    for path in sorted((stage_dir / "stats").glob("*.json")):
        for i, step in enumerate(json.loads(path.read_text())):
            if i == len(steps):
                steps.append((step["name"], Counter()))
            for label, value in step["stats"].items():
                steps[i][1][label] += value["total"] if isinstance(value, dict) else value
    return steps


def job_report(output: str | Path) -> dict:
    logs = Path(output) / "logs"
    stages = {name: stage_counts(logs / name) for name in STAGE_ORDER if (logs / name).is_dir()}
    report = {"read": 0, "bad_input": {}, "dropped": {}, "kept": 0, "tasks": {}}
    for name, steps in stages.items():
        done = len(list((logs / name / "completions").glob("*")))
        report["tasks"][name] = done
        for i, (step, counts) in enumerate(steps):
            if name == "filter" and i == 0:  # the reader
                report["read"] += counts["documents"]
                report["bad_input"] = {k.removeprefix("bad_"): v for k, v in counts.items() if k.startswith("bad_")}
            reasons = {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_")}
            if counts["dropped"]:
                reasons = reasons or {"duplicate" if name == "dedup" else "dropped": counts["dropped"]}
                report["dropped"][step] = reasons
    last = stages.get("dedup") or stages.get("filter") or []
    report["kept"] = last[-1][1]["total"] if last else 0
    return report


def format_report(report: dict) -> str:
    lines = [f"read {report['read']} documents, kept {report['kept']}"]
    for reason, n in sorted(report["bad_input"].items()):
        lines.append(f"  unusable input: {n} {reason}")
    for step, reasons in report["dropped"].items():
        for reason, n in sorted(reasons.items()):
            lines.append(f"  dropped by {step}: {n} {reason}")
    return "\n".join(lines)
