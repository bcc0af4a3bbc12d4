"""The MCP tool-use evaluation: generated cases (count, determinism, disjoint splits, checked on the real servers),
the tool SFT data, and `minicpm4 eval mcp` end to end on the tiny trained tool model (tests/tool_model.py), which
answers every tool prompt with add(a=2, b=3) and every tool result with a fixed sentence, so each score is known."""

import asyncio
import json
from collections import Counter

import pytest
from click.testing import CliRunner

from minicpm4.apps.tool_cases import generate_cases
from minicpm4.apps.tool_eval import check_cases, read_cases
from minicpm4.apps.tool_sft_data import build_tool_chats, control_chats, train_cases
from minicpm4.cli import _register_all, cli
from minicpm4.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generated_cases_are_many_deterministic_and_checked():
    cases = generate_cases(0)
    assert len(cases) >= 200 and cases == generate_cases(0) and cases != generate_cases(1)
    kinds = Counter((c["server"], c["kind"]) for c in cases)
    assert all(kinds[(s, k)] >= 10 for s in ("calculator", "filesystem", "clock", "notes") for k in ("single", "multi"))
    assert kinds[("calculator+notes", "multi")] == 10
    assert len({c["query"] for c in cases}) == len(cases)
    asyncio.run(check_cases(cases))  # schemas as the servers list them; multi-step chains run on real servers
    broken = json.loads(json.dumps(cases[0]))  # add, then multiply the sum: break the dependency
    broken["steps"][1]["arguments"]["a"] += 1
    with pytest.raises(InputError, match=r"step 1: argument 'a' = \d+, but the previous step returned"):
        asyncio.run(check_cases([broken]))
    with pytest.raises(InputError, match="tool 'shell' is not offered by server 'notes'"):
        asyncio.run(check_cases([{**cases[-60], "server": "notes", "steps": [{"name": "shell", "arguments": {}}]}]))


def test_sft_data_shares_nothing_with_the_eval_cases():
    cases = generate_cases(0)
    train = train_cases(cases, 6, seed=1)
    calls = {json.dumps([s["name"], s["arguments"]], sort_keys=True) for c in cases for s in c["steps"]}
    assert not {c["query"] for c in train} & {c["query"] for c in cases}
    assert not {json.dumps([s["name"], s["arguments"]], sort_keys=True) for c in train for s in c["steps"]} & calls
    chats = asyncio.run(build_tool_chats(train[:3] + train[-2:]))
    multi = chats[0]  # the first cases are multi-step: every call with the server's real result, then an answer
    roles = [m["role"] for m in multi["messages"]]
    assert roles[0] == "user" and roles[-1] == "assistant" and roles.count("tool") == len(train[0]["steps"]) >= 2
    assert multi["messages"][-1]["content"] == "Done. The tool returned: " + multi["messages"][-2]["content"]
    assert not any(m["content"].startswith("error:") for c in chats for m in c["messages"] if m["role"] == "tool")
    assert {t["function"]["name"] for t in chats[-1]["tools"]} >= {"multiply", "save_note"}  # cross-server
    control = control_chats(4, seed=1)
    assert len(control) == 4 and all("tools" not in c and len(c["messages"]) == 2 for c in control)


def test_eval_mcp_on_the_tiny_tool_model(tool_model_dir, tmp_path):
    add = {"name": "add", "arguments": {"a": 2, "b": 3}}
    cases = [
        {"id": "exact", "server": "calculator", "kind": "single", "query": "What is 2 plus 3?", "steps": [add]},
        {"id": "values", "server": "calculator", "kind": "single", "query": "What is 4 plus 5?",
         "steps": [{"name": "add", "arguments": {"a": 4, "b": 5}}]},
        {"id": "names", "server": "calculator", "kind": "single", "query": "Add 2, 3 and 1.",
         "steps": [{"name": "add", "arguments": {"a": 2, "b": 3, "c": 1}}]},
        {"id": "function", "server": "calculator", "kind": "single", "query": "What is 2 times 3?",
         "steps": [{"name": "multiply", "arguments": {"a": 2, "b": 3}}]},
        # step 2 sees add's real result (5) as context; the tiny model then answers instead of calling
        {"id": "multi", "server": "calculator+notes", "kind": "multi", "query": "Add 2 and 3, save it as note s.",
         "steps": [add, {"name": "save_note", "arguments": {"key": "s", "text": "5"}}]},
    ]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    _register_all()
    argv = ["eval", "mcp", "--model", str(tool_model_dir), "--dtype", "fp32", "--cases", str(tmp_path / "cases.jsonl"),
            "-o", str(tmp_path / "out"), "--max-new-tokens", "40"]
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["overall"] == {"function_name": 66.7, "argument_names": 50.0, "argument_values": 33.3, "steps": 6}
    assert report["by_server"]["calculator"]["argument_values"] == 25.0
    assert report["by_kind"]["multi"] == {"function_name": 50.0, "argument_names": 50.0, "argument_values": 50.0,
                                          "steps": 2}
    records = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()}
    assert records["exact"]["steps"][0]["predicted"] == [add]
    assert records["multi"]["steps"][1]["predicted"] is None  # the model's trained answer, not a call
    assert "overall" in result.output and "66.7" in result.output
    # a rerun finds every case done: same report, no new lines
    again = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert again.exit_code == 0 and json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == len(cases)
    # the same model behind the OpenAI-compatible server, evaluated through --base-url: the same scores
    from server_util import running_server

    from minicpm4.serve.llm import LLM
    with running_server(LLM.load(str(tool_model_dir), dtype="fp32")) as (url, _):
        remote = CliRunner().invoke(cli, ["eval", "mcp", "--base-url", url + "/v1", "--served-model", "test-model",
                                          "--cases", str(tmp_path / "cases.jsonl"), "-o", str(tmp_path / "remote"),
                                          "--max-new-tokens", "40"], catch_exceptions=False)
    assert remote.exit_code == 0, remote.output
    assert json.loads((tmp_path / "remote" / "report.json").read_text())["overall"] == report["overall"]
    both = CliRunner().invoke(cli, argv + ["--base-url", "http://127.0.0.1:1/v1"])
    assert both.exit_code == 2 and "give --model or --base-url, not both" in both.output


def test_bad_cases_files_name_the_line_and_field(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps({"id": "a", "server": "calculator", "query": "q", "steps": [{"name": "add"}]}) + "\n")
    with pytest.raises(InputError, match=r"cases.jsonl:1: steps\[0\] must be"):
        read_cases(path)
    path.write_text(json.dumps({"id": "a", "server": "weather", "query": "q", "steps": []}) + "\n")
    with pytest.raises(InputError, match="cases.jsonl:1: field 'server': unknown server 'weather'"):
        read_cases(path)
    path.write_text("{}\n")
    with pytest.raises(InputError, match="cases.jsonl:1: field 'id' must be a str"):
        read_cases(path)
