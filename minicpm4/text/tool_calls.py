"""Tool calls as text: OpenAI tools and tool calls rendered into a chat, and the model's calls parsed back out.

Two formats; `detect_format` picks one per model:
- minicpm: MiniCPM4's own (official chat template, MCP data). Tools are listed as Python stubs in the system
  prompt; the assistant writes an optional <|thought_start|>...<|thought_end|>, then <|tool_call_start|>, a
  ```python block with one call a line (`add(a=1,b=2)`), <|tool_call_end|>, then an optional answer. Calls are
  read with `ast`, keyword arguments with literal values only: nothing is ever evaluated. Results go back as
  `tool` messages, a role MiniCPM4's template has.
- json: Hermes/Qwen/SmolLM2 style. Tool specs as JSON inside <tools></tools>; each call is a block
  <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>; results go back as user
  messages wrapped in <tool_response></tool_response>.

`render_messages` turns OpenAI messages (tools, assistant tool_calls, tool results) into plain {role, content}
messages any ChatML template renders. `parse_output` (whole text) runs `StreamParser` (pieces), so a streamed
reply and a whole one always parse alike. Text that only looks like a call (bad syntax, no end marker) stays
content; a well-formed call of an unknown tool, or with arguments its JSON schema rejects, is a ToolCallError.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from typing import Any

from minicpm4.errors import InputError

# ---- what the model sees: the tool list and calling rules, and past calls in the model's own syntax ----
# The texts are the ones the models were trained on: MiniCPM's official chat template (Python stubs, then its
# "Function Call Rule and Output Format" section) and the Hermes/Qwen tool prompt (JSON specs in <tools>).

MINICPM, JSON = "minicpm", "json"
THOUGHT = ("<|thought_start|>", "<|thought_end|>")
MINICPM_CALL = ("<|tool_call_start|>", "<|tool_call_end|>")
JSON_CALL = ("<tool_call>", "</tool_call>")
_PY_TYPES = {"string": "str", "number": "float", "integer": "int", "boolean": "bool", "null": "None",
             "array": "list", "object": "dict"}

# The rules MiniCPM's official template puts under the function list; the model was trained on this wording.
_MINICPM_RULES = """# Function Call Rule and Output Format
- If the user's question can be answered without calling any function, please answer the user's question directly. In this situation, you should return your thought and answer the user's question directly.
- If the user cannot be answered without calling any function, and the user does not provide enough information to call functions, please ask the user for more information. In this situation, you should return your thought and ask the user for more information.
- If the user's question cannot be answered without calling any function, and the user has provided enough information to call functions to solve it, you should call the functions. In this situation, the assistant should return your thought and call the functions.
- Use default parameters unless the user has specified otherwise.
- You should answer in the following format:

<|thought_start|>
{explain why the user's question can be answered without calling a function or why you should ask the user for more information or why you should call one or more functions and your plan to solve the user's question.}
<|thought_end|>
<|tool_call_start|>
```python
func1(params_name=params_value, params_name2=params_value2...)
func2(params)
```
<|tool_call_end|>
{answer the user's question directly or ask the user for more information}"""

_JSON_RULES = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def py_name(name: str) -> str:
    """The identifier a tool is called by in python syntax (MCP names may hold '-' or '.')."""
    ident = re.sub(r"\W", "_", name)
    return "_" + ident if ident[0].isdigit() else ident


def render_calls(calls: list[tuple[str, dict]], content: str, fmt: str) -> str:
    """An assistant turn with calls, written as the model itself writes it (calls first for MiniCPM, as its
    template does; content first for the json format, as Hermes/Qwen templates do)."""
    if fmt == MINICPM:
        lines = "\n".join(py_name(name) + "(" + ",".join(f"{k}={json.dumps(v, ensure_ascii=False)}"
                                                           for k, v in args.items()) + ")" for name, args in calls)
        return f"{MINICPM_CALL[0]}\n```python\n{lines}\n```\n{MINICPM_CALL[1]}\n{content}"
    blocks = "\n".join(f"{JSON_CALL[0]}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n{JSON_CALL[1]}"
                       for n, a in calls)
    return f"{content}\n{blocks}" if content else blocks


def tools_prompt(specs: dict[str, dict], fmt: str, mode: str, forced: str | None) -> str:
    """The system-prompt section listing the tools, with an instruction for tool_choice 'required' or a name."""
    if fmt == MINICPM:
        stubs = "\n\n".join(_python_stub(spec) for spec in specs.values())
        prompt = (f"# Functions\nHere is a list of functions that you can invoke:\n```python\n{stubs}\n```\n\n"
                  + _MINICPM_RULES)
    else:
        prompt = _JSON_RULES.format(tools="\n".join(json.dumps({"type": "function", "function": s}, ensure_ascii=False)
                                                    for s in specs.values()))
    if mode == "required":
        prompt += "\n\nYou must call at least one function in your reply."
    elif mode == "function":
        prompt += f"\n\nYou must call the function {py_name(forced) if fmt == MINICPM else forced} in your reply."
    return prompt


def _python_stub(spec: dict) -> str:
    """A function spec as the Python stub MiniCPM's template lists: signature, description, Args."""
    params = spec["parameters"]
    props, required = params.get("properties") or {}, set(params.get("required") or ())
    sig, doc = [], []
    for name, p in props.items():
        p = p if isinstance(p, dict) else {}
        kind = _PY_TYPES.get(p.get("type"), "Any") if isinstance(p.get("type"), str) else "Any"
        default = "" if name in required else " = " + (json.dumps(p["default"]) if isinstance(p.get("default"), str)
                                                        else repr(p.get("default")))
        sig.append(f"{name}: {kind}{default}")
        doc.append(f"        {name} ({kind}): {p.get('description', '')}".rstrip())
    args = "\n\n    Args:\n" + "\n".join(doc) if doc else ""
    return f'def {py_name(spec["name"])}({", ".join(sig)}):\n    """{spec["description"]}{args}\n    """'


# ---- rendering OpenAI messages and parsing the model's calls ----

FORMATS = (MINICPM, JSON)
ROLES = ("system", "user", "assistant", "tool")
_JSON_NAMES = {"true": True, "false": False, "null": None}  # MiniCPM's template writes values with tojson


class ToolCallError(InputError):
    """A tool call names a tool that is not offered, or has arguments the tool's schema rejects."""


def detect_format(chat_template: str | None, vocab: set[str] | dict) -> str:
    """'minicpm' for models that know MiniCPM's call markers (vocabulary or template), else 'json'."""
    marker = MINICPM_CALL[0]
    return MINICPM if marker in vocab or marker in (chat_template or "") else JSON


def check_tools(tools: list[dict] | None) -> dict[str, dict]:
    """The OpenAI `tools` list checked (shape, unique names, valid JSON schemas): {name: function spec}."""
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise InputError(f"tools must be a list, got {type(tools).__name__}")
    from jsonschema.exceptions import SchemaError  # a dependency of mcp, only needed once tools are used
    from jsonschema.validators import validator_for
    specs: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InputError(f"{where}.type must be 'function'")
        fn = tool.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}.function.name must be a non-empty string")
        if name in specs:
            raise InputError(f"{where}.function.name {name!r} is already used by another tool")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        try:
            validator_for(params).check_schema(params)
        except (SchemaError, TypeError, AttributeError) as e:
            raise InputError(f"{where}.function.parameters is not a valid JSON schema: "
                             f"{getattr(e, 'message', e)}") from None
        specs[name] = {"name": name, "description": str(fn.get("description") or ""), "parameters": params}
    return specs


def check_tool_choice(tool_choice: str | dict | None, specs: dict[str, dict]) -> tuple[str, str | None]:
    """(mode, forced name): mode is 'none', 'auto', 'required' or 'function' (then the name is set)."""
    if tool_choice is None:
        return ("auto" if specs else "none"), None
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not specs:
            raise InputError("tool_choice 'required' needs at least one tool in tools")
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or tool_choice.get("type") != "function":
        raise InputError("tool_choice must be 'none', 'auto', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
    if fn.get("name") not in specs:
        raise InputError(f"tool_choice.function.name {fn.get('name')!r} is not one of the tools")
    return "function", fn["name"]


def render_messages(messages: list[dict], tools: list[dict] | None = None, tool_choice: str | dict | None = None,
                    fmt: str = JSON) -> list[dict]:
    """OpenAI chat messages -> [{role, content}] in the model's own tool syntax, ready for its chat template."""
    if fmt not in FORMATS:
        raise InputError(f"unknown tool-call format {fmt!r} (known: {', '.join(FORMATS)})")
    specs = check_tools(tools)
    mode, forced = check_tool_choice(tool_choice, specs)
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list")
    out: list[dict] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise InputError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content = _text(m.get("content"), f"{where}.content", nullable=role == "assistant")
        if role == "assistant" and m.get("tool_calls"):
            content = render_calls(_check_calls(m["tool_calls"], f"{where}.tool_calls"), content, fmt)
        if role == "tool" and fmt == JSON:
            block = f"<tool_response>\n{content}\n</tool_response>"
            if i > 0 and messages[i - 1].get("role") == "tool":  # one user turn holds consecutive results
                out[-1]["content"] += "\n" + block
                continue
            role, content = "user", block
        out.append({"role": role, "content": content})
    if specs and mode != "none":
        prompt = tools_prompt(specs, fmt, mode, forced)
        if out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_output(text: str, tools: list[dict] | None, fmt: str) -> tuple[str | None, list[dict]]:
    """Model text -> (content without call markup or thought, OpenAI tool_calls with JSON-string arguments)."""
    parser = StreamParser(fmt, tools)
    events = parser.push(text) + parser.finish()
    content = "".join(value for kind, value in events if kind == "content")
    return content or None, [value for kind, value in events if kind == "tool_call"]


class StreamParser:
    """Incremental parse_output: push(piece) and finish() return events ("content", str) / ("tool_call", dict).

    Text that could be the start of a marker is held back until it is known not to be, so markup never
    reaches content; a block is parsed once its end marker (and the newline that follows it) has arrived.
    Content is stripped at both ends overall, as parse_output's is: leading whitespace is dropped and
    trailing whitespace is held until more content follows it.
    """

    def __init__(self, fmt: str, tools: list[dict] | None):
        if fmt not in FORMATS:
            raise InputError(f"unknown tool-call format {fmt!r} (known: {', '.join(FORMATS)})")
        self.specs = check_tools(tools)
        self._py_names = {py_name(name): name for name in self.specs}
        self._validators: dict[str, Any] = {}
        self._blocks = dict([MINICPM_CALL, THOUGHT]) if fmt == MINICPM else dict([JSON_CALL])
        self._buf, self._open, self._started, self._space = "", None, False, ""

    def push(self, piece: str) -> list[tuple[str, Any]]:
        self._buf += piece
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, Any]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        while self._buf:
            if self._open is None:
                hits = [(i, m) for m in self._blocks if (i := self._buf.find(m)) >= 0]
                if hits:
                    i, self._open = min(hits)
                    self._content(self._buf[:i], events)
                    self._buf = self._buf[i:]
                    continue
                cut = len(self._buf) - (0 if final else _partial_marker(self._buf, self._blocks))
                self._content(self._buf[:cut], events)
                self._buf = self._buf[cut:]
                break
            end = self._buf.find(self._blocks[self._open], len(self._open))
            stop = end + len(self._blocks[self._open])
            if end < 0 or (stop == len(self._buf) and not final):
                if final:  # an unterminated block is not a call: it stays as text
                    self._content(self._buf, events)
                    self._buf = ""
                break
            block, self._buf = self._buf[:stop], self._buf[stop:]
            marker, self._open = self._open, None
            calls = [] if marker == THOUGHT[0] else self._calls(marker, block[len(marker):-len(self._blocks[marker])])
            if calls is None:
                self._content(block, events)
                continue
            events += [("tool_call", call) for call in calls]
            self._buf = self._buf.removeprefix("\n")  # the newline after an end marker is part of the markup
        return events

    def _content(self, text: str, events: list) -> None:
        joined = self._space + (text if self._started else text.lstrip())
        body = joined.rstrip()
        self._space = joined[len(body):]
        if body:
            self._started = True
            events.append(("content", body))

    def _calls(self, marker: str, body: str) -> list[dict] | None:
        """The checked OpenAI calls in one block, or None when the block is not well-formed."""
        found = (_json_call if marker == JSON_CALL[0] else _python_calls)(body.strip())
        return None if found is None else [self._checked(name, args) for name, args in found]

    def _checked(self, name: str, args: dict) -> dict:
        real = name if name in self.specs else self._py_names.get(name)
        if real is None:
            raise ToolCallError(f"the model called unknown tool {name!r} (tools: {', '.join(self.specs) or 'none'})")
        if real not in self._validators:
            from jsonschema.validators import validator_for
            schema = self.specs[real]["parameters"]
            self._validators[real] = validator_for(schema)(schema)
        from jsonschema.exceptions import best_match
        error = best_match(self._validators[real].iter_errors(args))
        if error is not None:
            field = ".".join(str(p) for p in error.absolute_path)
            raise ToolCallError(f"tool {real!r}: {f'argument {field!r}' if field else 'arguments'}: {error.message}")
        return {"id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": real, "arguments": json.dumps(args, ensure_ascii=False)}}


def _partial_marker(text: str, markers) -> int:
    """Length of the longest end of `text` that is the beginning of a marker."""
    return max((k for m in markers for k in range(1, min(len(m), len(text) + 1)) if text.endswith(m[:k])), default=0)


def _python_calls(body: str) -> list[tuple[str, dict]] | None:
    fenced = re.fullmatch(r"```(?:python|py)?\s*(.*?)\s*```", body, re.S)
    try:
        tree = ast.parse(fenced.group(1) if fenced else body)
    except (SyntaxError, ValueError, RecursionError):
        return None
    if not tree.body or not all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
                                and isinstance(s.value.func, ast.Name) for s in tree.body):
        return None
    calls = []
    for stmt in tree.body:
        call, name = stmt.value, stmt.value.func.id
        if call.args or any(kw.arg is None for kw in call.keywords):
            raise ToolCallError(f"tool {name!r}: arguments must be written name=value")
        calls.append((name, {kw.arg: _literal(kw.value, name, kw.arg) for kw in call.keywords}))
    return calls


def _literal(node: ast.expr, tool: str, field: str) -> Any:
    """The JSON value a literal expression denotes; anything else (names, calls, operators) is refused."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)):
        return -node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, tool, field) for e in node.elts]
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
        return {k.value: _literal(v, tool, field) for k, v in zip(node.keys, node.values)}
    raise ToolCallError(f"tool {tool!r}: argument {field!r} is not a literal value: {ast.unparse(node)[:80]}")


def _json_call(body: str) -> list[tuple[str, dict]] | None:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))  # Llama-style models say "parameters"
    return [(obj["name"], args)] if isinstance(args, dict) else None


def _text(content: Any, where: str, nullable: bool) -> str:
    if content is None and nullable:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InputError(f"{where} must be a string or a list of text parts")


def _check_calls(calls: Any, where: str) -> list[tuple[str, dict]]:
    if not isinstance(calls, list):
        raise InputError(f"{where} must be a list")
    checked = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(f"{where}[{j}].function.name must be a non-empty string")
        args = fn.get("arguments") or "{}"
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise InputError(f"{where}[{j}].function.arguments is not valid JSON") from None
        if not isinstance(args, dict):
            raise InputError(f"{where}[{j}].function.arguments must be a JSON object")
        checked.append((fn["name"], args))
    return checked


