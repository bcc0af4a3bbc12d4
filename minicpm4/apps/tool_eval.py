"""The MCP tool-use evaluation: generated cases (tool_cases.py) run through the agent's model turn against the
bundled MCP servers, scored with the official nested metrics (tool_call_metrics.py).

Each case offers the model the tools of its server(s), as the MCP servers list them. Step k of a case is one
model turn (agent.model_turn) on the conversation: the query, then the ground-truth calls of steps 0..k-1 with
the results the real servers returned for them (the official eval gives earlier ground-truth steps as context).
The model's reply is parsed in its tool-call format and its calls scored against step k's ground truth; the
model's own calls are never executed (a wrong write_file would change the state later cases read).

Cases run concurrently (`concurrency` at a time) so their model turns can share a decode batch; results go to
OUT/results.jsonl one case per line as each finishes, so a rerun skips finished cases, and OUT/report.json
(atomic) holds the accuracies per server, per kind and overall.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Awaitable, Callable

from minicpm4.apps.mcp_servers import SERVERS, server_command
from minicpm4.apps.tool_call_metrics import LEVELS, accuracies, normalize_value, score_call
from minicpm4.errors import InputError
from minicpm4.fileio import atomic_write_text
from minicpm4.serve.agent import MCPTools, model_turn
from minicpm4.text.tool_calls import ToolCallError, parse_output

Complete = Callable[[list[dict]], str | Awaitable[str]]


def read_cases(path: str | Path) -> list[dict]:
    """Cases from a JSONL file, each checked for the fields the runner reads (errors name line and field)."""
    cases = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON: {e}") from None
        for field, kind in (("id", str), ("server", str), ("query", str), ("steps", list)):
            if not isinstance(case.get(field) if isinstance(case, dict) else None, kind):
                raise InputError(f"{path}:{n}: field {field!r} must be a {kind.__name__}")
        for i, step in enumerate(case["steps"]):
            if not (isinstance(step, dict) and isinstance(step.get("name"), str)
                    and isinstance(step.get("arguments"), dict)):
                raise InputError(f"{path}:{n}: steps[{i}] must be {{\"name\": str, \"arguments\": object}}")
        for server in case["server"].split("+"):
            if server not in SERVERS:
                raise InputError(f"{path}:{n}: field 'server': unknown server {server!r} (known: {', '.join(SERVERS)})")
        cases.append(case)
    return cases


def offered_specs(tools: MCPTools, server: str) -> list[dict]:
    """The specs of the bundled server(s) a case names ("calculator+notes": both)."""
    names = {n for s in server.split("+") for n in tools.server_tools[SERVERS.index(s)]}
    return [spec for spec in tools.specs if spec["function"]["name"] in names]


def predicted_calls(raw: str, specs: list[dict], fmt: str) -> list[dict] | None:
    """The calls in a reply as {"name", "arguments"}, read without schema checks (a call with wrong arguments
    is scored, not rejected); None when the reply holds no well-formed call of an offered tool."""
    loose = [{"type": "function", "function": {**s["function"], "parameters": {"type": "object"}}} for s in specs]
    try:
        _, calls = parse_output(raw, loose, fmt)
    except ToolCallError:
        return None
    return [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
            for c in calls] or None


def assistant_call(step: dict, k: int) -> tuple[dict, str]:
    """A ground-truth step as the assistant message that makes the call, and the call id its result answers."""
    call_id = f"call_{k}"
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function",
         "function": {"name": step["name"], "arguments": json.dumps(step["arguments"], ensure_ascii=False)}}]}, call_id


async def run_case(case: dict, complete: Complete, tools: MCPTools, fmt: str) -> dict:
    """One case: a model turn per step, scored; the ground-truth call then runs on the servers for context."""
    specs = offered_specs(tools, case["server"])
    conversation = [{"role": "user", "content": case["query"]}]
    steps = []
    for k, truth in enumerate(case["steps"]):
        raw = await model_turn(complete, conversation, specs, fmt)
        predicted = predicted_calls(raw, specs, fmt)
        steps.append({"truth": {"name": truth["name"], "arguments": truth["arguments"]}, "predicted": predicted,
                      "raw": raw, "scores": score_call(predicted, truth)})
        if k + 1 < len(case["steps"]):
            message, call_id = assistant_call(truth, k)
            result = await tools.call(truth["name"], truth["arguments"])
            conversation += [message, {"role": "tool", "tool_call_id": call_id, "content": result}]
    return {"id": case["id"], "server": case["server"], "kind": case.get("kind", "single"), "steps": steps}


def summarize(records: list[dict]) -> dict:
    """Accuracies overall, per server and per kind (single / multi), over steps."""
    def acc(rs):
        return accuracies([s["scores"] for r in rs for s in r["steps"]])
    groups = {}
    for key in ("server", "kind"):
        groups[f"by_{key}"] = {v: acc([r for r in records if r[key] == v]) for v in sorted({r[key] for r in records})}
    return {"overall": acc(records), **groups, "cases": len(records)}


async def evaluate(cases: list[dict], complete: Complete, fmt: str, out_dir: str | Path, concurrency: int = 8,
                   on_case: Callable[[dict], None] | None = None, meta: dict | None = None) -> dict:
    """Run the cases not yet in OUT/results.jsonl, then write and return the report (see the module doc)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = _read_results(results_path)
    todo = [c for c in cases if c["id"] not in done]
    if todo:
        async with MCPTools([server_command(s) for s in SERVERS]) as tools:
            gate = asyncio.Semaphore(concurrency)
            with results_path.open("a") as sink:
                async def one(case: dict) -> None:
                    async with gate:
                        record = await run_case(case, complete, tools, fmt)
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()  # a finished case survives an interruption
                    done[record["id"]] = record
                    if on_case is not None:
                        on_case(record)
                await asyncio.gather(*(one(c) for c in todo))
    report = {**(meta or {}), "format": fmt, **summarize([done[c["id"]] for c in cases if c["id"] in done])}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def _read_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interruption: that case runs again
            continue
        records[record["id"]] = record
    return records


def format_report(report: dict) -> str:
    """The accuracies as a table: one row per server, per kind, and overall."""
    rows = [("group", "steps", *LEVELS)]
    for key in ("by_server", "by_kind"):
        rows += [(name, str(a["steps"]), *(f"{a[lv]:.1f}" for lv in LEVELS)) for name, a in report[key].items()]
    o = report["overall"]
    rows.append(("overall", str(o["steps"]), *(f"{o[lv]:.1f}" for lv in LEVELS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


async def check_cases(cases: list[dict]) -> None:
    """Every ground-truth call is valid for its tool's schema as the server lists it, and every multi-step case
    runs on fresh real servers without an error result, each "uses_result" argument equal to the previous
    result. Raises InputError naming the case and step."""
    from jsonschema.validators import validator_for
    async with MCPTools([server_command(s) for s in SERVERS]) as tools:
        for case in cases:
            specs = {s["function"]["name"]: s["function"]["parameters"] for s in offered_specs(tools, case["server"])}
            for k, step in enumerate(case["steps"]):
                where = f"case {case['id']} step {k}"
                if step["name"] not in specs:
                    raise InputError(f"{where}: tool {step['name']!r} is not offered by server {case['server']!r}")
                schema = specs[step["name"]]
                errors = [e.message for e in validator_for(schema)(schema).iter_errors(step["arguments"])]
                if errors:
                    raise InputError(f"{where}: arguments {step['arguments']} fail the schema: {errors[0]}")
        for case in (c for c in cases if len(c["steps"]) > 1):
            previous = None
            for k, step in enumerate(case["steps"]):
                where = f"case {case['id']} step {k}"
                used = step.get("uses_result")
                if used and normalize_value(str(step["arguments"][used])) != normalize_value(previous):
                    raise InputError(f"{where}: argument {used!r} = {step['arguments'][used]!r}, but the previous "
                                     f"step returned {previous!r}")
                previous = await tools.call(step["name"], step["arguments"])
                if previous.startswith("error:"):
                    raise InputError(f"{where}: the server answered {previous!r}")
