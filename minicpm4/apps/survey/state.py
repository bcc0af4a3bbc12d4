"""A survey run's state: one JSON file beside the output (`survey.md` -> `survey.md.state.json`), rewritten
atomically after every step and every entailment judgment.

It holds the topic and settings, the survey so far, every passage shown to the model (keyed by bibkey, so a
citation is checked against what was retrieved, not against the whole index), the previous step's plan and
results, the history of replies, and the judgments made at finalization. A rerun of the same command reads it
and goes on from the last completed step; a step cut off mid-way is simply asked again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minicpm4.apps.survey.document import new_survey
from minicpm4.errors import InputError
from minicpm4.fileio import atomic_write_text

FORMAT = 1


@dataclass
class RunState:
    topic: str
    settings: dict
    survey: dict = field(default_factory=new_survey)
    step: int = 0  # steps completed
    retrieved: dict = field(default_factory=dict)  # bibkey -> passage dict, everything ever shown
    last: dict = field(default_factory=lambda: {"thought": "", "tool_call": "{}", "results": [], "errors": []})
    history: list = field(default_factory=list)
    finish_reason: str | None = None  # "finalize" (the model's call) or "max_steps"
    judgments: dict = field(default_factory=dict)  # cache key -> {"supported": bool | None, "reply": str}
    final: dict | None = None  # the citation report, once the survey is written
    format: int = FORMAT

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), ensure_ascii=False, indent=1))


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.json")


def load_state(path: Path) -> RunState:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable run state ({e}); delete it (or pass --restart) to start over") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path}: not a survey run state of format {FORMAT}; delete it (or pass --restart)")
    try:
        return RunState(**data)
    except TypeError as e:
        raise InputError(f"{path}: run state has unexpected fields ({e}); delete it (or pass --restart)") from None


def open_state(path: Path, topic: str, settings: dict, restart: bool = False) -> RunState:
    """The saved state when it is for the same topic; a fresh one when none is saved or `restart` is set."""
    if restart or not path.is_file():
        return RunState(topic=topic, settings=settings)
    state = load_state(path)
    if state.topic != topic:
        raise InputError(f"{path}: this run is about {state.topic!r}, not {topic!r}; use another -o, or --restart")
    return state
