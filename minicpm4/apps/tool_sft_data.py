"""Tool-use SFT data by reverse generation (the MiniCPM4-MCP recipe: first the calls, then a query that needs
them), and a control set of non-tool chats with the same format.

build_tool_chats: cases of the "train" split of tool_cases.py (value pools disjoint from the eval split's),
without any query or ground-truth call of the eval cases, each run on the real bundled servers: a conversation
of the query, every call with the result the server returned, and a short final answer that quotes the last
result. The tools are the specs the servers list, so the model trains on the prompt it is evaluated with.

control_chats: verse-completion chats from the offline KJV text (minicpm4.corpus), the same JSONL format
without tools, for an SFT run that matches the tool run's steps but teaches nothing about tools.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from minicpm4.apps.mcp_servers import SERVERS, server_command
from minicpm4.apps.tool_cases import generate_cases
from minicpm4.apps.tool_eval import assistant_call, check_cases, offered_specs
from minicpm4.fileio import atomic_write_text
from minicpm4.serve.agent import MCPTools


def _call_key(step: dict) -> str:
    return json.dumps([step["name"], step["arguments"]], sort_keys=True)


def train_cases(eval_cases: list[dict], n_per_server: int, seed: int) -> list[dict]:
    """Train-split cases sharing no query and no ground-truth call with eval_cases."""
    queries = {c["query"] for c in eval_cases}
    calls = {_call_key(s) for c in eval_cases for s in c["steps"]}
    cases = generate_cases(seed, per_server=n_per_server, cross=max(1, n_per_server // 5), split="train",
                           exclude=queries)
    return [c for c in cases if not any(_call_key(s) in calls for s in c["steps"])]


async def build_tool_chats(cases: list[dict]) -> list[dict]:
    """One chat per case ({"messages", "tools"}), the calls run on fresh real servers."""
    await check_cases(cases)
    chats = []
    async with MCPTools([server_command(s) for s in SERVERS]) as tools:
        for case in cases:
            messages = [{"role": "user", "content": case["query"]}]
            result = ""
            for k, step in enumerate(case["steps"]):
                message, call_id = assistant_call(step, k)
                result = await tools.call(step["name"], step["arguments"])
                messages += [message, {"role": "tool", "tool_call_id": call_id, "content": result}]
            messages.append({"role": "assistant", "content": f"Done. The tool returned: {result}"})
            chats.append({"messages": messages, "tools": offered_specs(tools, case["server"])})
    return chats


def control_chats(n: int, seed: int) -> list[dict]:
    """n verse-completion chats (first half of a KJV verse -> the second half), no tools."""
    from minicpm4.corpus import kjv_verses
    rng = random.Random(seed)
    verses = [v.split() for _, v in kjv_verses() if 10 <= len(v.split()) <= 30]
    chats = []
    for words in rng.sample(verses, n):
        cut = len(words) // 2
        chats.append({"messages": [{"role": "user", "content": "Continue this verse: " + " ".join(words[:cut])},
                                   {"role": "assistant", "content": " ".join(words[cut:])}]})
    return chats


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path
