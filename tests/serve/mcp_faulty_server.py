"""An MCP server that misbehaves on request, for the agent's hardening tests: `python tests/serve/mcp_faulty_server.py`.

sleep() outlasts a per-call timeout, crash() kills the process mid-call, big() returns more text than the agent
passes on, and remove() is marked destructive (MCP annotation destructive_hint) so the agent asks first.
"""

import os
import time

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("faulty", log_level="WARNING")
REMOVED = []


@server.tool()
def sleep(seconds: float) -> str:
    """Sleep, then say so."""
    time.sleep(seconds)
    return f"slept {seconds}s"


@server.tool()
def crash() -> str:
    """Exit the server process without answering."""
    os._exit(3)


@server.tool()
def big(n: int) -> str:
    """n characters of output."""
    return "x" * n


@server.tool(annotations=ToolAnnotations(destructive_hint=True))
def remove(name: str) -> str:
    """Remove something (marked destructive)."""
    REMOVED.append(name)
    return f"removed {name} (removed so far: {', '.join(REMOVED)})"


if __name__ == "__main__":
    server.run("stdio")
