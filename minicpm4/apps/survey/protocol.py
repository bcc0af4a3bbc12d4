"""The step format of MiniCPM4-Survey: prompts in, parsed steps out.

Each reply has two parts. First the current update: <think>...</think> then <answer>{"update": <position>,
"content": ...}</answer> ("{}" skips the update). Then the next plan: <think>...</think> then
<tool_call>{"name": "search_engine", "arguments": {"query": [...]}}</tool_call>, or the "finalize" tool
("{}" means: write on without searching). The user turn shows the topic, the survey so far, the previous
step's plan and the passages its search returned, each under a bibkey ("p17") that the text cites as
\\cite{p17}. The wording is ours; the structure follows the public MiniCPM4-Survey demo.

Parsing is lenient about what small models get wrong (code fences, raw newlines in JSON strings, a missing
closing tag) and records every problem as an error string, which the next prompt shows the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from minicpm4.apps.survey.document import outline_view

SYSTEM = """You write a survey about the user's topic, step by step, from retrieved passages.

At every step do two things.
(1) Current update: think inside <think>...</think> about how to write the part named by the current plan
from the retrieved information, then give one update inside <answer>...</answer>:
<answer>{"update": "<position>", "content": "<text>"}</answer>
Positions: "title", "abstract", "introduction", "section-1", "section-1/subsection-1", "conclusion".
To plan the survey, give the outline as content: {"update": "outline", "content": {"title": "...",
"sections": [{"title": "...", "plan": "..."}]}}. Cite retrieved passages by their bibkey, as \\cite{p12} or
\\cite{p12,p40}; cite only bibkeys shown to you. If there is nothing to update, answer <answer>{}</answer>.
(2) Next plan: think inside <think>...</think> about which part to write next and what to search for, then
call one tool inside <tool_call>...</tool_call>:
<tool_call>{"name": "search_engine", "arguments": {"query": ["keywords 1", "keywords 2"]}}</tool_call>
or, when the survey is complete:
<tool_call>{"name": "finalize", "arguments": {}}</tool_call>
Use valid JSON inside <answer> and <tool_call>."""

USER = """Update the survey following the instructions.
**Topic**
{topic}

**Current survey**
{survey}

**Current plan**
<think>{thought}</think>
<tool_call>{tool_call}</tool_call>
{errors}
**Retrieved information**
{passages}

Reply in the output format: (1) <think>, <answer>; (2) <think>, <tool_call>."""


@dataclass
class ParsedStep:
    answer_thought: str = ""
    plan_thought: str = ""
    update: dict | None = None  # {"update": position, "content": ...}
    tool: str | None = None  # "search_engine", "finalize" or None (no tool call)
    queries: list[str] = field(default_factory=list)
    tool_call_text: str = "{}"
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def passage_block(key: str, passage: dict, text: str | None = None) -> str:
    return f"bibkey: {key}\nTitle: {passage['title']} ({passage['source']})\nContent: {text or passage['text']}"


def user_prompt(topic: str, survey: dict, thought: str, tool_call: str, passages: list[str], errors: list[str]) -> str:
    shown = "\n\n".join(passages) if passages else "There are no results."
    err = ("\n**Problems with your last reply**\n" + "\n".join(f"- {e}" for e in errors) + "\n") if errors else ""
    return USER.format(topic=topic, survey=outline_view(survey), thought=thought or "I need to get enough information.",
                       tool_call=tool_call or "{}", errors=err, passages=shown)


def _tag(text: str, tag: str) -> list[str]:
    """Contents of <tag>...</tag>; an unclosed last tag runs to the end of the text (a reply cut by max_tokens)."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)
    tail = text.rsplit(f"</{tag}>", 1)[-1]
    if f"<{tag}>" in tail:
        found.append(tail.split(f"<{tag}>", 1)[1])
    return [f.strip() for f in found]


def loads_lenient(text: str):
    """JSON from a model: code fences dropped, raw control characters allowed, else the outermost {...}."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if start >= 0 and end > start:
        return json.loads(text[start:end + 1], strict=False)  # raises JSONDecodeError for the caller
    raise json.JSONDecodeError("no JSON object", text, 0)


def parse_reply(text: str) -> ParsedStep:
    step = ParsedStep()
    thoughts = _tag(text, "think")
    step.answer_thought = thoughts[0] if thoughts else ""
    step.plan_thought = thoughts[1] if len(thoughts) > 1 else ""
    answers = _tag(text, "answer")
    if not answers:
        step.errors.append("no <answer>...</answer> found")
    elif answers[0] not in ("", "{}"):
        try:
            update = loads_lenient(answers[0])
            if not isinstance(update, dict) or "update" not in update or "content" not in update:
                step.errors.append('<answer> must be {"update": <position>, "content": ...}')
            else:
                step.update = update
        except json.JSONDecodeError as e:
            step.errors.append(f"<answer> is not valid JSON ({e.msg})")
    calls = _tag(text, "tool_call")
    if not calls:
        step.errors.append("no <tool_call>...</tool_call> found")
        return step
    step.tool_call_text = calls[0] or "{}"
    if calls[0] in ("", "{}"):
        return step
    try:
        call = loads_lenient(calls[0])
    except json.JSONDecodeError as e:
        step.errors.append(f"<tool_call> is not valid JSON ({e.msg})")
        return step
    name = call.get("name") if isinstance(call, dict) else None
    if name == "finalize":
        step.tool = "finalize"
    elif name == "search_engine":
        query = (call.get("arguments") or {}).get("query") if isinstance(call.get("arguments"), dict) else None
        queries = [query] if isinstance(query, str) else query
        if not isinstance(queries, list) or not any(isinstance(q, str) and q.strip() for q in queries):
            step.errors.append("search_engine needs arguments.query: a list of keyword strings")
        else:
            step.tool, step.queries = "search_engine", [q.strip() for q in queries if isinstance(q, str) and q.strip()]
    else:
        step.errors.append(f"unknown tool {name!r}: call search_engine or finalize")
    return step
