"""Tool specs (OpenAI `tools` format) and validation of a model's tool call against them.

A call is kept only if it names a tool in the set and its arguments are a JSON object that validates
against that tool's `parameters` JSON Schema (names, types, required fields, enums); this is the
UltraChat v2 rule "drop samples whose tool is not in the tool set or whose arguments break the schema".
"""

from __future__ import annotations

import json
from pathlib import Path

from minicpm4.errors import ConfigError


def load_tools(path: str | Path) -> list[dict]:
    """Read a JSON list of OpenAI tool specs and check every `parameters` is a valid JSON Schema."""
    import jsonschema

    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"tools {path}: cannot read a JSON list ({e})") from None
    if not isinstance(tools, list) or not tools:
        raise ConfigError(f"tools {path}: expected a non-empty JSON list of tool specs")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ConfigError(f"tools {path}: item {i} has no function.name")
        try:
            jsonschema.validators.validator_for(fn.get("parameters", {})).check_schema(fn.get("parameters", {}))
        except jsonschema.SchemaError as e:
            raise ConfigError(f"tools {path}: {fn['name']}.parameters is not a JSON Schema ({e.message})") from None
    return tools


def validate_call(call: dict, tools: list[dict]) -> str | None:
    """None if the call is valid, else the reason: unknown_tool, arguments_not_object or schema: <detail>."""
    import jsonschema

    by_name = {t["function"]["name"]: t["function"] for t in tools}
    name, args = call.get("name"), call.get("arguments")
    if name not in by_name:
        return "unknown_tool"
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return "arguments_not_object"
    if not isinstance(args, dict):
        return "arguments_not_object"
    schema = by_name[name].get("parameters", {})
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(args))
    return None if error is None else f"schema: {error.message}"
