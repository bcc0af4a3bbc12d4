"""MCP servers bundled for tool-use evaluation and demos, each on the official SDK's MCPServer and startable
alone over stdio:

    python -m minicpm4.apps.mcp_servers.calculator
    python -m minicpm4.apps.mcp_servers.filesystem [--root DIR]   (default: a fresh temp dir, removed on exit)
    python -m minicpm4.apps.mcp_servers.clock                      (the "time" server)
    python -m minicpm4.apps.mcp_servers.notes [--path FILE]        (default: a file in a fresh temp dir)

Tools that change or delete state carry the MCP annotation destructive_hint=True, so an agent can ask first.
"""

from __future__ import annotations

import shlex
import sys

SERVERS = ("calculator", "filesystem", "clock", "notes")


def server_command(name: str, *args: str) -> str:
    """The shell command that starts a bundled server with this interpreter (for MCPTools / --mcp)."""
    if name not in SERVERS:
        raise ValueError(f"unknown bundled MCP server {name!r} (known: {', '.join(SERVERS)})")
    return shlex.join([sys.executable, "-m", f"minicpm4.apps.mcp_servers.{name}", *args])
