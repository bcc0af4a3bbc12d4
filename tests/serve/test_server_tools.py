"""Tool calls end to end on the tiny tool model (tests/tool_model.py: it calls add(a=2, b=3) on a user turn and
answers ANSWER after a tool result): the live server with the real `openai` client (client-side tools, whole and
streamed, the follow-up turn, tool_choice "none", a call its schema rejects), the server running a real MCP
server's tools itself (serve --mcp; raw HTTP so the `tool_messages` extension is visible), and `minicpm4 agent`.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package is built on here
import openai
import pytest
from server_util import running_server
from tool_model import ADD_TOOL, ANSWER, CALL, _fn

from minicpm4.serve.llm import LLM
from minicpm4.text.tool_calls import render_messages

ECHO_SERVER = shlex.join([sys.executable, str(Path(__file__).resolve().parent / "mcp_echo_server.py")])
ADD23 = {"a": 2, "b": 3}
QUESTION = [{"role": "user", "content": "what is 2+3?"}]


@pytest.fixture(scope="module")
def server(tool_model_dir):
    # a fresh LLM per server: the server's engine thread owns its engine
    with running_server(LLM.load(tool_model_dir, dtype="fp32"), max_tokens=64) as (url, srv):
        assert srv.tool_format == "json"  # detected from the SmolLM2 tokenizer the model was trained with
        yield url, srv


@pytest.fixture(scope="module")
def mcp_server(tool_model_dir):
    # the prefix cache on, so the turn after the tool result reuses blocks
    llm = LLM.load(tool_model_dir, dtype="fp32", prefix_cache_gb=0.01)
    with running_server(llm, max_tokens=64, mcp_commands=[ECHO_SERVER]) as (url, srv):
        yield url, srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def chat(client, messages, **kw):
    return client.chat.completions.create(model="test-model", messages=messages, temperature=0, max_tokens=48, **kw)


def sse_events(response) -> list:
    """The data of every server-sent event, parsed ([DONE] kept as the string)."""
    events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_tool_call_whole(client):
    r = chat(client, QUESTION, tools=[ADD_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content  # the call markup is not content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > len("call_")
    assert call.function.name == "add" and json.loads(call.function.arguments) == ADD23
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_tool_call_streamed(client):
    chunks = list(chat(client, QUESTION, tools=[ADD_TOOL], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    assert "<tool_call>" not in content and "</tool_call>" not in content and "{" not in content
    assert content.strip() == ""
    calls = [tc for d in deltas for tc in d.tool_calls or ()]
    assert len(calls) == 1
    call = calls[0]
    assert call.index == 0 and call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "add" and json.loads(call.function.arguments) == ADD23
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.parametrize("tools_again", [True, False], ids=["with_tools", "without_tools"])
def test_follow_up_with_the_tool_result_gets_the_answer(client, tools_again):
    tools = {"tools": [ADD_TOOL]} if tools_again else {}
    first = chat(client, QUESTION, tools=[ADD_TOOL]).choices[0].message
    [call] = first.tool_calls
    messages = QUESTION + [first.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    r = chat(client, messages, **tools)
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    # and streamed
    chunks = list(chat(client, messages, stream=True, **tools))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tool_choice_none_returns_text_and_leaves_the_tools_out(client, server):
    r = chat(client, QUESTION, tools=[ADD_TOOL], tool_choice="none")
    message = r.choices[0].message
    assert message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert isinstance(message.content, str) and message.content
    # the prompt was the bare conversation: no tool list was rendered into it (encode_chat is the tokenizer
    # only; nothing is generated on the served LLM here)
    assert r.usage.prompt_tokens == len(server[1].llm.encode_chat(QUESTION))
    with_tools = chat(client, QUESTION, tools=[ADD_TOOL])
    assert with_tools.usage.prompt_tokens > r.usage.prompt_tokens


def test_call_against_the_tool_schema_is_a_400_naming_tool_and_field(client, server):
    string_a = _fn("add", "Add two integers.", a="string", b="integer")  # the model still writes "a": 2
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, QUESTION, tools=[string_a])
    assert e.value.status_code == 400
    # the raw body: OpenAI-style error naming the tool and the argument
    r = httpx.post(server[0] + "/v1/chat/completions", timeout=60, json={
        "model": "test-model", "messages": QUESTION, "tools": [string_a], "temperature": 0, "max_tokens": 48})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert "'add'" in err["message"] and "'a'" in err["message"] and "string" in err["message"]
    # streamed, the call is only known mid-stream: the stream ends with that error event instead of [DONE]
    with httpx.stream("POST", server[0] + "/v1/chat/completions", timeout=60, json={
            "model": "test-model", "messages": QUESTION, "tools": [string_a], "temperature": 0, "max_tokens": 48,
            "stream": True}) as resp:
        events = sse_events(resp)
    assert "[DONE]" not in events
    last = events[-1]["error"]
    assert last["type"] == "invalid_request_error" and "'add'" in last["message"] and "'a'" in last["message"]
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in events[:-1])


def check_tool_messages(steps: list) -> None:
    """The agent's steps: the assistant's call to add(2, 3), then the real MCP server's result "5"."""
    assert [m["role"] for m in steps] == ["assistant", "tool"]
    [call] = steps[0]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "add" and json.loads(call["function"]["arguments"]) == ADD23
    assert not steps[0]["content"]
    assert steps[1] == {"role": "tool", "tool_call_id": call["id"], "content": "5"}


def test_serve_mcp_runs_the_tools_itself(mcp_server):
    url = mcp_server[0]
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "test-model", "messages": QUESTION, "temperature": 0, "max_tokens": 48})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert body["choices"][0]["finish_reason"] == "stop"
    check_tool_messages(body["tool_messages"])
    usage = body["usage"]  # two model turns: the call, then the answer
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the second turn's prompt extends the first: a prefill chunk ends right after the "<|im_start|>assistant\n"
    # that opened the first turn's reply (engine.chunk_ends), so the cache serves all of the first prompt
    srv = mcp_server[1]
    first = srv.llm.encode_chat(render_messages(QUESTION, srv.mcp.specs, "auto", srv.tool_format))
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(first) > 0
    # the openai client reads the same answer
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert chat(client, QUESTION).choices[0].message.content == ANSWER


def test_serve_mcp_streamed(mcp_server):
    with httpx.stream("POST", mcp_server[0] + "/v1/chat/completions", timeout=120, json={
            "model": "test-model", "messages": QUESTION, "temperature": 0, "max_tokens": 48, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    [steps] = [c["tool_messages"] for c in chunks if "tool_messages" in c]
    check_tool_messages(steps)


def test_serve_mcp_leaves_a_requests_own_tools_to_the_client(mcp_server):
    client = openai.OpenAI(base_url=mcp_server[0] + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.with_raw_response.create(model="test-model", messages=QUESTION, tools=[ADD_TOOL],
                                                          temperature=0, max_tokens=48)
    assert "tool_messages" not in r.http_response.json()
    choice = r.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == ADD23


def test_agent_command(tool_model_dir):
    r = subprocess.run([sys.executable, "-m", "minicpm4.cli", "agent", "--model", str(tool_model_dir),
                        "--dtype", "fp32", "--mcp", ECHO_SERVER, "--prompt", "what is 2+3?"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f'[tool call] add({json.dumps(ADD23)})\n[tool result] 5\n{ANSWER}\n', r.stdout
    assert CALL not in r.stdout  # the markup was parsed, not printed


def test_tool_choice_without_tools_and_unsupported_mcp_options_are_400(server, mcp_server):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    r = httpx.post(server[0] + "/v1/chat/completions", timeout=60,
                   json={"model": "m", "messages": msgs, "tool_choice": "required"})
    assert r.status_code == 400 and "tool_choice" in r.json()["error"]["message"]
    for extra in ({"n": 2}, {"logprobs": True}, {"tool_choice": "required"}):
        r = httpx.post(mcp_server[0] + "/v1/chat/completions", timeout=60, json={"model": "m", "messages": msgs, **extra})
        assert r.status_code == 400 and "MCP" in r.json()["error"]["message"], extra
