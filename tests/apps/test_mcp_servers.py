"""The bundled MCP servers (minicpm4/apps/mcp_servers), each started alone over stdio by the official SDK client."""

import asyncio
import json
import subprocess
import sys

import pytest

from minicpm4.apps.mcp_servers import SERVERS, server_command
from minicpm4.serve.agent import MCPTools


def with_server(command, body):
    async def go():
        async with MCPTools([command], call_timeout=30) as tools:
            return await body(tools)
    return asyncio.run(go())


def names(tools):
    return [s["function"]["name"] for s in tools.specs]


def test_calculator():
    async def body(tools):
        assert names(tools) == ["add", "subtract", "multiply", "divide", "power", "square_root", "round_number",
                                "evaluate"]
        assert tools.destructive == set()
        assert await tools.call("add", {"a": 2, "b": 3}) == "5"  # whole results as ints
        assert await tools.call("divide", {"a": 7, "b": 2}) == "3.5"
        assert await tools.call("round_number", {"x": 3.14159, "digits": 2}) == "3.14"
        assert await tools.call("evaluate", {"expression": "(2 + 3) * 4 - 2 ** 3"}) == "12"
        assert "division by zero" in await tools.call("divide", {"a": 1, "b": 0})
        refused = await tools.call("evaluate", {"expression": "__import__('os').getcwd()"})
        assert refused.startswith("error:") and "unsupported element" in refused
        assert "too large" in await tools.call("evaluate", {"expression": "10 ** 10 ** 10"})
    with_server(server_command("calculator"), body)


def test_filesystem_is_sandboxed(tmp_path):
    root = tmp_path / "root"
    (tmp_path / "secret.txt").write_text("outside")
    root.mkdir()
    (root / "link").symlink_to(tmp_path)

    async def body(tools):
        assert tools.destructive == {"write_file", "delete_file", "move_file"}
        assert await tools.call("write_file", {"path": "docs/a.txt", "content": "hello"}) == \
            "wrote 5 characters to /docs/a.txt"
        assert (root / "docs" / "a.txt").read_text() == "hello"
        assert await tools.call("read_file", {"path": "/docs/a.txt"}) == "hello"
        for escape in ("../secret.txt", "/../secret.txt", "link/secret.txt", "docs/../../secret.txt"):
            answer = await tools.call("read_file", {"path": escape})
            assert answer.startswith("error:") and "outside the sandbox" in answer, escape
        assert await tools.call("list_directory", {"path": "/"}) == "docs/\nlink/"
        assert await tools.call("move_file", {"source": "docs/a.txt", "destination": "b.md"}) == \
            "moved /docs/a.txt to /b.md"
        assert await tools.call("search_files", {"pattern": "*.md"}) == "/b.md"
        info = json.loads(await tools.call("get_file_info", {"path": "b.md"}))
        assert info["kind"] == "file" and info["size"] == 5
        assert await tools.call("delete_file", {"path": "b.md"}) == "deleted /b.md"
        assert "no such file" in await tools.call("read_file", {"path": "b.md"})
    with_server(server_command("filesystem", "--root", str(root)), body)
    assert (tmp_path / "secret.txt").read_text() == "outside"


def test_time():
    async def body(tools):
        assert names(tools) == ["get_current_time", "convert_time", "add_days", "days_between", "day_of_week"]
        assert await tools.call("add_days", {"start_date": "2024-02-27", "days": 3}) == "2024-03-01"
        assert await tools.call("days_between", {"start_date": "2024-01-01", "end_date": "2025-01-01"}) == "366"
        assert await tools.call("day_of_week", {"day": "2000-01-01"}) == "Saturday"
        now = await tools.call("get_current_time", {"timezone": "Asia/Kolkata"})
        assert now.endswith("+05:30")
        converted = await tools.call("convert_time", {"source_timezone": "Asia/Kolkata", "time": "12:00",
                                                      "target_timezone": "Asia/Tokyo"})
        assert converted.endswith("T15:30+09:00")
        assert "unknown time zone 'Mars/Base'" in await tools.call("get_current_time", {"timezone": "Mars/Base"})
        assert "start_date must be a date" in await tools.call("add_days", {"start_date": "soon", "days": 1})
    with_server(server_command("clock"), body)


def test_notes_persist_in_their_file(tmp_path):
    store = tmp_path / "notes.json"

    async def first(tools):
        assert tools.destructive == {"save_note", "delete_note"}
        assert await tools.call("save_note", {"key": "shop", "text": "milk"}) == "saved note 'shop'"
        assert await tools.call("append_to_note", {"key": "shop", "text": "Eggs"}) == "appended to note 'shop'"
        assert await tools.call("save_note", {"key": "todo", "text": "call Anna"}) == "saved note 'todo'"
        assert await tools.call("delete_note", {"key": "todo"}) == "deleted note 'todo'"
        assert "no note named 'todo'" in await tools.call("get_note", {"key": "todo"})

    async def second(tools):  # a new server process on the same file
        assert await tools.call("get_note", {"key": "shop"}) == "milk\nEggs"
        assert await tools.call("list_notes", {"prefix": "sh"}) == "shop"
        assert await tools.call("search_notes", {"query": "EGGS"}) == "shop"
        assert await tools.call("list_notes", {"prefix": "x"}) == "(no notes)"
    with_server(server_command("notes", "--path", str(store)), first)
    assert json.loads(store.read_text()) == {"shop": "milk\nEggs"}
    with_server(server_command("notes", "--path", str(store)), second)


def test_every_server_starts_alone_as_a_module():
    # `python -m minicpm4.apps.mcp_servers.<name> --help` needs no client: it proves the module entry point
    for name in ("filesystem", "notes"):
        out = subprocess.run([sys.executable, "-m", f"minicpm4.apps.mcp_servers.{name}", "--help"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout
    with pytest.raises(ValueError, match="unknown bundled MCP server 'shell'"):
        server_command("shell")
    assert SERVERS == ("calculator", "filesystem", "clock", "notes")
