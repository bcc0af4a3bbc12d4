"""MCP servers started by the agent and by `serve --mcp` (both through MCPTools) die with the process that
started them, even under kill -9 and even when they would not notice their closed stdin: here the "server" is a
`sleep` that never answers, so the parent is killed while it waits for the handshake."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PARENT = """
import asyncio
from minicpm4.serve.agent import MCPTools
asyncio.run(MCPTools(["sleep 600"], timeout=600).__aenter__())
"""


def children_named(pid: int, name: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()
        if comm == name and int(rest[1]) == pid and rest[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_mcp_server_dies_with_a_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (servers := children_named(parent.pid, "sleep")) and time.time() < deadline:
            assert parent.poll() is None, parent.stderr.read().decode()
            time.sleep(0.05)
        assert servers, "the MCP server never started"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 20
    while any(alive(p) for p in servers) and time.time() < deadline:
        time.sleep(0.05)
    left = [p for p in servers if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"MCP server process(es) {left} outlived their killed parent"
