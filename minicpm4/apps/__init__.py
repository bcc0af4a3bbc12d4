"""The paper's applications, built on the layers below: MCP tool use (bundled MCP servers, generated evaluation
cases, the official nested metrics, reverse-generated SFT data)."""
