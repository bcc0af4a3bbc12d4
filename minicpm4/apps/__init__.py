"""The paper's applications (MiniCPM4 report, section 6), built on the layers below: survey/ is MiniCPM4-Survey;
MCP tool use is the bundled MCP servers (mcp_servers/), generated evaluation cases, the official nested metrics and
reverse-generated SFT data."""
