"""An MCP agent: a model answers a prompt, calling tools that MCP servers expose over stdio, in a loop.

    minicpm4 agent --model M --mcp "python serve/server.py --flag" [--mcp "CMD ARGS" ...] --prompt "What is 2+3?"
    -> agent_main(model, mcp_commands, prompt, max_tokens=512, temperature=0.0, max_turns=8, dtype="auto",
                  system=None, call_timeout=60, max_output_chars=20000, confirm=ask_on_terminal)

MCPTools starts each server with the official SDK (`stdio_client` + `ClientSession`), lists its tools as OpenAI
function specs and sends each call to the server that owns the tool; a name no server exposes is refused. A call
that times out, a server that dies mid-call, an oversized result and a destructive tool the user declines each
become an "error: ..." (or cut) tool result, so one bad tool never ends the loop.
run_agent is the loop: render the conversation with the tools (tools.render_messages) -> complete -> parse
(tools.parse_output) -> run the calls and append their results as `tool` messages, until the model answers
without calling anything. `complete` is any function from rendered chat messages to the model's raw text, so
a real model (complete_with_llm) and a scripted one plug in the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import shlex
import shutil
import sys
from typing import Any, Awaitable, Callable

from minicpm4 import children
from minicpm4.errors import InputError, MiniCPM4Error
from minicpm4.text.tool_calls import ToolCallError, detect_format, parse_output, render_messages

Complete = Callable[[list[dict]], str | Awaitable[str]]


class AgentError(MiniCPM4Error):
    """The agent loop could not finish: an MCP server failed, or the model kept calling tools."""


class MCPTools:
    """Tools of MCP servers started over stdio (async context manager; the servers stop on exit).

    `.specs` are OpenAI function specs; a tool name shared by several servers is exposed as s<i>_<name>
    (i = the server's index in `commands`), other names unchanged; `.server_tools[i]` are server i's exposed
    names. `call(name, arguments)` returns the result as text; a tool's own error result, a call that runs past
    `call_timeout` seconds, a server that dies mid-call (its tools then answer at once that it is gone) and a
    call the user declines all come back as text starting with "error:", so the model can read them and the
    loop goes on. Results past `max_output_chars` are cut, saying so. Tools a server marks destructive (MCP
    annotation destructive_hint) run only if `confirm(name, arguments)` says yes; confirm=None runs them all.
    """

    def __init__(self, commands: list[str], timeout: float = 60.0, call_timeout: float | None = None,
                 max_output_chars: int = 20_000, confirm: Callable[[str, dict], bool] | None = None):
        self.commands = []
        for command in commands:
            try:
                self.commands.append(shlex.split(command))
            except ValueError as e:  # an unclosed quote
                raise InputError(f"MCP server command {command!r}: {e}") from None
            if not self.commands[-1]:
                raise InputError("an MCP server command is empty")
        for field, value in (("timeout", timeout), ("call_timeout", call_timeout)):
            if value is not None and not value > 0:
                raise InputError(f"{field} must be a positive number of seconds, got {value!r}")
        if not isinstance(max_output_chars, int) or max_output_chars < 1:
            raise InputError(f"max_output_chars must be a positive integer, got {max_output_chars!r}")
        self.timeout = timeout  # seconds start-up and listing may take
        self.call_timeout = call_timeout or timeout  # seconds one tool call may take
        self.max_output_chars = max_output_chars
        self.confirm = confirm
        self.specs: list[dict] = []
        self.server_tools: list[list[str]] = [[] for _ in commands]
        self.destructive: set[str] = set()  # exposed names of tools marked destructive
        self._routes: dict[str, tuple[int, Any, str]] = {}  # exposed name -> (server index, session, own name)
        self._dead: dict[int, str] = {}  # server index -> why it is gone
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> "MCPTools":
        from mcp import ClientSession, StdioServerParameters  # the `serve` extra: imported only for agents
        from mcp.client.stdio import stdio_client
        listed = []
        try:
            for index, argv in enumerate(self.commands):
                try:
                    # the servers' stderr goes to ours; the SDK needs a real file there, which a replaced
                    # sys.stderr (pytest capture, Jupyter) is not
                    errlog = sys.stderr if _has_fileno(sys.stderr) else sys.__stderr__
                    if shutil.which(argv[0]) is None:  # the launcher below would only report it on stderr
                        raise FileNotFoundError(f"{argv[0]}: command not found")
                    wrapped = children.wrap(argv)  # so the server dies with us, even under kill -9
                    streams = await self._stack.enter_async_context(
                        stdio_client(StdioServerParameters(command=wrapped[0], args=wrapped[1:]), errlog=errlog))
                    session = await self._stack.enter_async_context(
                        ClientSession(*streams, read_timeout_seconds=self.timeout))
                    await session.initialize()
                    listed.append((index, session, await _list_tools(session)))
                except Exception as e:  # not found, crashed, not an MCP server, timed out: one line, naming it
                    raise AgentError(f"MCP server {shlex.join(argv)!r} failed to start: "
                                     f"{type(e).__name__}: {e}") from None
        except BaseException:
            await self._stack.aclose()
            raise
        counts: dict[str, int] = {}
        for _, _, tools in listed:
            for tool in tools:
                counts[tool.name] = counts.get(tool.name, 0) + 1
        for index, session, tools in listed:
            for tool in tools:
                name = tool.name if counts[tool.name] == 1 else f"s{index}_{tool.name}"
                self._routes[name] = (index, session, tool.name)
                self.server_tools[index].append(name)
                if tool.annotations is not None and tool.annotations.destructive_hint:
                    self.destructive.add(name)
                self.specs.append({"type": "function", "function": {
                    "name": name, "description": tool.description or "",
                    "parameters": tool.input_schema or {"type": "object", "properties": {}}}})
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._stack.aclose()

    async def call(self, name: str, arguments: dict) -> str:
        if name not in self._routes:
            raise ToolCallError(f"no MCP server exposes a tool named {name!r} (tools: {', '.join(self._routes)})")
        if not isinstance(arguments, dict):
            raise ToolCallError(f"tool {name!r}: arguments must be a JSON object, got {arguments!r}")
        from mcp import MCPError
        from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT
        index, session, own_name = self._routes[name]
        server = shlex.join(self.commands[index])
        if index in self._dead:
            return f"error: tool {name!r} is unavailable: {self._dead[index]}"
        if name in self.destructive and self.confirm is not None and not self.confirm(name, arguments):
            return f"error: the user declined to run {name!r}, which the server marks destructive"
        try:
            result = await session.call_tool(own_name, arguments, read_timeout_seconds=self.call_timeout)
        except MCPError as e:  # a protocol-level failure is shown to the model as well, and the loop goes on
            if e.code == REQUEST_TIMEOUT:
                return f"error: tool {name!r} timed out after {self.call_timeout:g}s (MCP server {server!r})"
            if e.code == CONNECTION_CLOSED:
                self._dead[index] = f"MCP server {server!r} exited during a call to {name!r}"
                return f"error: {self._dead[index]}; its tools are no longer available"
            return f"error: {e.message}"
        parts = [block.text if block.type == "text" else f"[{block.type} content]" for block in result.content]
        if not parts and result.structured_content is not None:
            parts = [json.dumps(result.structured_content, ensure_ascii=False)]
        text = _limited("\n".join(parts), self.max_output_chars)
        return f"error: {text}" if result.is_error else text


def _limited(text: str, limit: int) -> str:
    """text, or its first `limit` characters and a note of what was cut (a model's context is small)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[output truncated: {limit} of {len(text)} characters shown]"


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


async def _list_tools(session) -> list:
    """Every tool of a server, following pagination cursors."""
    from mcp.types import PaginatedRequestParams
    tools, cursor = [], None
    while True:
        page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            return tools


async def model_turn(complete: Complete, conversation: list[dict], specs: list[dict], fmt: str) -> str:
    """The model's raw reply to the conversation, with `specs` offered in the model's tool syntax."""
    raw = complete(render_messages(conversation, specs, "auto", fmt))
    if inspect.isawaitable(raw):  # the server's complete awaits its engine thread
        raw = await raw
    return raw


async def run_agent(complete: Complete, tools: MCPTools, messages: list[dict], fmt: str, max_turns: int = 8,
                    on_message: Callable[[dict], None] | None = None) -> list[dict]:
    """Complete, call tools, repeat; returns the whole conversation (OpenAI messages) ending in the answer.

    on_message sees each message as it is appended. A call the tools reject (unknown name, arguments against
    the schema) is answered with an error message, so the model can correct itself on its next turn.
    """
    conversation = list(messages)

    def append(message: dict) -> None:
        conversation.append(message)
        if on_message is not None:
            on_message(message)

    for _ in range(max_turns):
        raw = await model_turn(complete, conversation, tools.specs, fmt)
        try:
            content, calls = parse_output(raw, tools.specs, fmt)
        except ToolCallError as e:
            append({"role": "assistant", "content": raw})
            append({"role": "user", "content": f"error: {e}"})
            continue
        if not calls:
            append({"role": "assistant", "content": content or ""})
            return conversation
        append({"role": "assistant", "content": content, "tool_calls": calls})
        for call in calls:
            fn = call["function"]
            append({"role": "tool", "tool_call_id": call["id"],
                    "content": await tools.call(fn["name"], json.loads(fn["arguments"]))})
    raise AgentError(f"no final answer after {max_turns} model turns (the model kept calling tools); "
                     "raise max_turns or simplify the prompt")


def complete_with_llm(llm, max_tokens: int = 512, temperature: float = 0.0) -> Complete:
    """A `complete` function backed by a minicpm4.LLM: the chat template, then generation."""
    from minicpm4.engine.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature)
    return lambda messages: llm.chat(messages, params).text


def ask_on_terminal(name: str, arguments: dict) -> bool:
    """Ask on the terminal before a destructive tool runs; without a terminal to ask on, the answer is no."""
    if not sys.stdin or not sys.stdin.isatty():
        print(f"[declined] {name} is marked destructive and there is no terminal to confirm it on "
              "(pass --yes to allow such tools)", flush=True)
        return False
    answer = input(f"Run destructive tool {name}({json.dumps(arguments, ensure_ascii=False)})? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def agent_main(model: str | None, mcp_commands: list[str], prompt: str, max_tokens: int = 512,
               temperature: float = 0.0, max_turns: int = 8, dtype: str = "auto",
               system: str | None = None, call_timeout: float = 60.0, max_output_chars: int = 20_000,
               confirm: Callable[[str, dict], bool] | None = ask_on_terminal,
               prefix_cache_gb: float = 1.0, prefill_chunk: int = 512) -> list[dict]:
    """Load the model, start the MCP servers, run the agent on one prompt; prints each tool call, each result
    and the final answer, and returns the conversation. confirm=None runs destructive tools without asking.
    Each model turn after a tool result reuses the engine's prefix cache (the conversation so far, up to its
    last whole prefill chunk) and prefills the rest; prefix_cache_gb=0 turns it off."""
    from minicpm4.serve.llm import LLM
    if not mcp_commands:
        raise InputError("the agent needs at least one MCP server command (--mcp)")
    llm = LLM.load(model, dtype=dtype, prefix_cache_gb=prefix_cache_gb, prefill_chunk=prefill_chunk)
    fmt = detect_format(llm.tokenizer.chat_template, llm.tokenizer.backend.get_vocab())
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

    def show(message: dict) -> None:
        for call in message.get("tool_calls") or ():
            print(f"[tool call] {call['function']['name']}({call['function']['arguments']})", flush=True)
        if message["role"] == "tool":
            print(f"[tool result] {message['content']}", flush=True)
        elif message["role"] == "user":  # a rejected call, sent back to the model
            print(f"[rejected] {message['content']}", flush=True)
        elif not message.get("tool_calls"):
            print(message["content"], flush=True)

    async def run() -> list[dict]:
        async with MCPTools(mcp_commands, call_timeout=call_timeout, max_output_chars=max_output_chars,
                            confirm=confirm) as tools:
            return await run_agent(complete_with_llm(llm, max_tokens, temperature), tools, messages, fmt,
                                   max_turns, on_message=show)
    return asyncio.run(run())
