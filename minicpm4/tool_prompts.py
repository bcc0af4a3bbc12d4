"""What a model sees of tools: the tool list and calling rules for the system prompt, and past calls written
in the model's own syntax (tools.py checks the input and calls these; see it for the two formats).

The texts are the ones the models were trained on: MiniCPM's official chat template (Python stubs, then its
"Function Call Rule and Output Format" section) and the Hermes/Qwen tool prompt (JSON specs in <tools>).
"""

from __future__ import annotations

import json
import re

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
