"""A real MCP server over stdio for the agent tests: `python tests/serve/mcp_echo_server.py`.

Built with the SDK's MCPServer so the tests exercise the same protocol path as any third-party server.
Its answers are fixed (integer addition, a four-entry capital table) so tests can assert exact results.
"""

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima"}

server = MCPServer("echo", log_level="WARNING")  # INFO would log every call on the test's stderr


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def capital(country: str) -> str:
    """The capital city of a country."""
    if country not in CAPITALS:
        # a ToolError's message reaches the client as an error result (is_error); any other exception is
        # reported as a crash with its message withheld
        raise ToolError(f"unknown country {country!r}")
    return CAPITALS[country]


if __name__ == "__main__":
    server.run("stdio")
