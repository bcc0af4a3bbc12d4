"""The MCP agent against a misbehaving real server (tests/serve/mcp_faulty_server.py) beside a sound one: a call
past the per-call timeout, a server that dies mid-call, oversized results and destructive tools, each answered
as a tool result so the loop goes on."""

import asyncio
import shlex
import sys
import time
from pathlib import Path

import pytest

from minicpm4.errors import InputError
from minicpm4.serve.agent import MCPTools, ask_on_terminal, run_agent

HERE = Path(__file__).parent
FAULTY = shlex.join([sys.executable, str(HERE / "mcp_faulty_server.py")])
ECHO = shlex.join([sys.executable, str(HERE / "mcp_echo_server.py")])


def with_tools(body, **options):
    async def go():
        async with MCPTools([FAULTY, ECHO], **options) as tools:
            return await body(tools)
    return asyncio.run(go())


def call(name, **arguments):
    import json
    return ('<tool_call>\n' + json.dumps({"name": name, "arguments": arguments}) + '\n</tool_call>')


def test_timeout_and_a_dying_server_leave_the_loop_running():
    replies = iter([call("sleep", seconds=30), call("crash"), call("big", n=3), call("add", a=2, b=3), "Done."])

    async def body(tools):
        started = time.monotonic()
        conversation = await run_agent(lambda _: next(replies), tools, [{"role": "user", "content": "Go."}], "json")
        return conversation, time.monotonic() - started
    conversation, seconds = with_tools(body, call_timeout=1.5)
    results = [m["content"] for m in conversation if m["role"] == "tool"]
    assert results[0] == f"error: tool 'sleep' timed out after 1.5s (MCP server {FAULTY!r})"
    assert results[1] == (f"error: MCP server {FAULTY!r} exited during a call to 'crash'; "
                          "its tools are no longer available")
    # the dead server's tools answer at once; the other server still works and the loop reaches its answer
    assert results[2] == f"error: tool 'big' is unavailable: MCP server {FAULTY!r} exited during a call to 'crash'"
    assert results[3] == "5"
    assert conversation[-1] == {"role": "assistant", "content": "Done."}
    assert seconds < 25  # the 30 s sleep was abandoned at the timeout


def test_long_results_are_cut_saying_so():
    async def body(tools):
        return await tools.call("big", {"n": 50}), await tools.call("big", {"n": 10})
    long, short = with_tools(body, max_output_chars=20)
    assert long == "x" * 20 + "\n[output truncated: 20 of 50 characters shown]"
    assert short == "x" * 10


def test_destructive_tools_need_confirmation():
    asked = []

    def confirm(name, arguments):
        asked.append((name, arguments))
        return arguments["name"] == "ok"

    async def body(tools):
        assert tools.destructive == {"remove"}
        return [await tools.call("remove", {"name": "no"}), await tools.call("remove", {"name": "ok"}),
                await tools.call("big", {"n": 2})]
    declined, accepted, plain = with_tools(body, confirm=confirm)
    assert declined == "error: the user declined to run 'remove', which the server marks destructive"
    assert accepted == "removed ok (removed so far: ok)"  # the declined call never reached the server
    assert plain == "xx" and asked == [("remove", {"name": "no"}), ("remove", {"name": "ok"})]
    # confirm=None (--yes) runs them without asking
    assert with_tools(lambda tools: tools.call("remove", {"name": "a"})) == "removed a (removed so far: a)"


def test_without_a_terminal_destructive_tools_are_declined(monkeypatch, capsys):
    class NoTty:
        def isatty(self):
            return False
    monkeypatch.setattr(sys, "stdin", NoTty())
    assert ask_on_terminal("remove", {"name": "x"}) is False
    assert "pass --yes" in capsys.readouterr().out


def test_bad_limits_are_named():
    with pytest.raises(InputError, match="call_timeout must be a positive number"):
        MCPTools([ECHO], call_timeout=0)
    with pytest.raises(InputError, match="max_output_chars must be a positive integer"):
        MCPTools([ECHO], max_output_chars=0)
