"""The MiniCPM4-MCP tool-call metrics (the nesting rules of the official `eval_scripts.py`).

For each scored step there is one ground-truth call {"name", "arguments"} and the model's prediction: None (no
parseable call) or the list of calls it made. From a list, the first call with the ground truth's name is
scored, else the first call. Three nested scores:

    function name   the names are equal
    argument names  ...and the SETS of argument names are equal (an extra or a missing argument fails)
    argument values ...and every value is equal after normalisation (normalize_value)

Each accuracy is over all steps (an invalid prediction counts as wrong at every level), so
function >= argument names >= argument values.
"""

from __future__ import annotations

from typing import Any

LEVELS = ("function_name", "argument_names", "argument_values")


def normalize_value(value: Any) -> Any:
    """Strings that spell a number become that number ("3.5" -> 3.5, "7" -> 7), "true"/"false" (any case) become
    booleans, other strings are lower-cased and stripped; every other value is kept as is (so 5 == 5.0)."""
    if not isinstance(value, str):
        return value
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value.lower().strip()


def pick_call(predicted: list[dict] | None, truth: dict) -> dict | None:
    """The predicted call to score against `truth`: the first with its name, else the first; None if none."""
    if not predicted:
        return None
    return next((c for c in predicted if c.get("name") == truth["name"]), predicted[0])


def score_call(predicted: list[dict] | None, truth: dict) -> dict[str, bool]:
    """{level: passed} for one step."""
    call = pick_call(predicted, truth)
    name = call is not None and call.get("name") == truth["name"]
    args, want = (call or {}).get("arguments") or {}, truth.get("arguments") or {}
    names = name and isinstance(args, dict) and set(args) == set(want)
    values = names and all(normalize_value(args[k]) == normalize_value(v) for k, v in want.items())
    return {"function_name": name, "argument_names": bool(names), "argument_values": bool(values)}


def accuracies(scores: list[dict[str, bool]]) -> dict[str, float | int]:
    """Percentages per level over the scored steps, and the step count."""
    n = len(scores)
    out: dict[str, float | int] = {level: round(100.0 * sum(s[level] for s in scores) / n, 1) if n else 0.0
                                   for level in LEVELS}
    out["steps"] = n
    return out
