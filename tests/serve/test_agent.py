"""The MCP agent (minicpm4/serve/agent.py) against a real MCP server, tests/serve/mcp_echo_server.py, started over stdio by
the SDK: tool listing and calls, name collisions across servers, the agent loop with a scripted model and with
the trained tiny tool model."""

import asyncio
import shlex
import sys
from pathlib import Path

import pytest

from minicpm4.errors import InputError
from minicpm4.serve.agent import AgentError, MCPTools, agent_main, run_agent
from minicpm4.text.tool_calls import ToolCallError

SERVER = shlex.join([sys.executable, str(Path(__file__).with_name("mcp_echo_server.py"))])
CALL_ADD = ("<|thought_start|>\nI should add the numbers.\n<|thought_end|>\n<|tool_call_start|>\n```python\n"
            "add(a=2, b=3)\n```\n<|tool_call_end|>\n")


def with_tools(commands, body):
    """Run body(tools) inside MCPTools(commands) on a fresh event loop."""
    async def go():
        async with MCPTools(commands) as tools:
            return await body(tools)
    return asyncio.run(go())


def test_list_and_call_tools_of_a_real_server():
    async def body(tools):
        assert [s["function"]["name"] for s in tools.specs] == ["add", "capital"]
        add = tools.specs[0]
        assert add["type"] == "function" and add["function"]["description"] == "Add two integers."
        assert add["function"]["parameters"]["required"] == ["a", "b"]
        assert add["function"]["parameters"]["properties"]["a"]["type"] == "integer"
        assert await tools.call("add", {"a": 2, "b": 3}) == "5"
        assert await tools.call("capital", {"country": "Kenya"}) == "Nairobi"
        missing = await tools.call("capital", {"country": "Atlantis"})
        assert missing.startswith("error:") and "unknown country 'Atlantis'" in missing
        assert (await tools.call("add", {"a": "x", "b": 1})).startswith("error:")
        with pytest.raises(ToolCallError, match="no MCP server exposes a tool named 'shell'"):
            await tools.call("shell", {"command": "rm -rf /"})
    with_tools([SERVER], body)


def test_names_shared_by_two_servers_get_the_server_index():
    async def body(tools):
        assert sorted(s["function"]["name"] for s in tools.specs) == ["s0_add", "s0_capital", "s1_add", "s1_capital"]
        assert await tools.call("s1_add", {"a": 40, "b": 2}) == "42"
        with pytest.raises(ToolCallError):
            await tools.call("add", {"a": 1, "b": 1})
    with_tools([SERVER, SERVER], body)


def test_a_server_that_cannot_start_is_named():
    with pytest.raises(AgentError, match="MCP server '/nonexistent/mcp-server --flag' failed to start"):
        with_tools(["/nonexistent/mcp-server --flag"], lambda tools: None)
    with pytest.raises(InputError, match="No closing quotation"):
        MCPTools(['python "serve/server.py'])
    with pytest.raises(InputError, match="command is empty"):
        MCPTools([SERVER, "  "])


def test_agent_loop_with_a_scripted_model():
    prompts = []

    def complete(rendered):
        prompts.append(rendered)
        if len(prompts) == 1:
            return CALL_ADD
        assert rendered[-1]["role"] == "tool"  # minicpm format: results go back as tool messages
        return f"2 + 3 = {rendered[-1]['content']}."

    question = [{"role": "user", "content": "What is 2 + 3?"}]
    conversation = with_tools([SERVER], lambda tools: run_agent(complete, tools, question, "minicpm"))
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant"]
    call = conversation[1]["tool_calls"][0]
    assert conversation[1]["content"] is None and call["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert conversation[2] == {"role": "tool", "tool_call_id": call["id"], "content": "5"}  # from the real server
    assert conversation[3] == {"role": "assistant", "content": "2 + 3 = 5."}
    assert "def add(a: int, b: int):" in prompts[0][0]["content"]  # the server's tools reached the prompt


def test_agent_refuses_tools_the_servers_do_not_expose():
    replies = iter(['<|tool_call_start|>\n```python\nshell(command="rm -rf /")\n```\n<|tool_call_end|>',
                    "I cannot do that."])
    conversation = with_tools([SERVER], lambda tools: run_agent(lambda _: next(replies), tools,
                                                                [{"role": "user", "content": "Clean up."}], "minicpm"))
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert conversation[2]["content"].startswith("error: the model called unknown tool 'shell'")
    assert conversation[3]["content"] == "I cannot do that."


def test_agent_stops_after_max_turns():
    with pytest.raises(AgentError, match="no final answer after 2 model turns"):
        with_tools([SERVER], lambda tools: run_agent(lambda _: CALL_ADD, tools,
                                                     [{"role": "user", "content": "Add forever."}], "minicpm", 2))


def test_agent_main_with_the_tiny_tool_model(tool_model_dir, capsys):
    # with one model turn allowed, the tiny model's first answer is its call add(a=2, b=3), so the agent runs the
    # call and then stops with AgentError (its trained answer would come on a second turn)
    with pytest.raises(AgentError, match="no final answer after 1 model turns"):
        agent_main(str(tool_model_dir), [SERVER], "What is 2 + 3?", max_tokens=48, max_turns=1, dtype="fp32")
    out = capsys.readouterr().out
    assert '[tool call] add({"a": 2, "b": 3})\n[tool result] 5\n' in out


def test_agent_turn_after_a_tool_result_prefills_only_the_new_tokens(tool_model_dir):
    """The engine's counters on the real tool model: the turn after the tool result extends the turn before,
    and the cache serves all of it (a prefill chunk ends right after the "<|im_start|>assistant\n" that opened
    the reply, engine.chunk_ends): prefilled are only the reply, the tool result and the template around them."""
    from minicpm4.engine.sampling import SamplingParams
    from minicpm4.serve.llm import LLM
    from minicpm4.text.tool_calls import detect_format

    chunk = 16
    llm = LLM.load(str(tool_model_dir), dtype="fp32", prefill_chunk=chunk, prefix_cache_gb=0.01)
    turns = []

    def complete(messages):  # agent.complete_with_llm, keeping each turn's prompt and engine Generation
        prompt = llm.encode_chat(messages)
        result = llm.generate_ids([prompt], SamplingParams(max_new_tokens=48))[0]
        turns.append((prompt, result.generation))
        return result.text
    fmt = detect_format(llm.tokenizer.chat_template, llm.tokenizer.backend.get_vocab())
    conversation = with_tools([SERVER], lambda tools: run_agent(
        complete, tools, [{"role": "user", "content": "What is 2 + 3?"}], fmt, max_turns=2))
    assert conversation[2] == {"role": "tool", "tool_call_id": conversation[1]["tool_calls"][0]["id"], "content": "5"}
    (p1, g1), (p2, g2) = turns
    assert p2[:len(p1)] == p1 and g1.cached_tokens == 0
    assert g2.cached_tokens == len(p1) > 0
