"""Tool calls as text (minicpm4/text/tool_calls.py): parsing literal model outputs in both formats, whole and streamed in
every small piece size, rendering OpenAI messages through a real chat template, and a trained tiny model whose
greedy reply parses to a call."""

import json
import re

import pytest
from hypothesis import given, settings, strategies as st
from tool_model import ADD_TOOL, CALL

import minicpm4
from minicpm4.errors import InputError
from minicpm4.text.tool_calls import (StreamParser, ToolCallError, check_tools, detect_format, parse_output,
                                      render_messages)

CAPITAL = {"type": "function", "function": {"name": "capital", "description": "Capital of a country.", "parameters": {
    "type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]}}}
PLOT = {"type": "function", "function": {"name": "plot-points", "description": "Draw points.", "parameters": {
    "type": "object", "properties": {"points": {"type": "array", "items": {"type": "array"}},
                                     "style": {"type": "object"}, "show": {"type": "boolean"},
                                     "title": {"type": ["string", "null"]}}, "required": ["points"]}}}
TOOLS = [ADD_TOOL, CAPITAL, PLOT]
ADD23 = ("add", {"a": 2, "b": 3})

# (model output, expected content, expected calls) for outputs that are well formed
MINICPM_OK = [
    ("<|tool_call_start|>\n```python\nadd(a=2, b=3)\n```\n<|tool_call_end|>\n", None, [ADD23]),
    ("<|thought_start|>\nI need a sum and a capital.\n<|thought_end|>\n<|tool_call_start|>\n```python\n"
     'add(a=2,b=3)\ncapital(country="France")\n```\n<|tool_call_end|>\nLet me check both.',
     "Let me check both.", [ADD23, ("capital", {"country": "France"})]),
    ('<|tool_call_start|>\n```python\nplot_points(points=[[1, -2.5], (3, 4)], style={"color": "red"}, show=true, '
     "title=None)\n```\n<|tool_call_end|>", None,
     [("plot-points", {"points": [[1, -2.5], [3, 4]], "style": {"color": "red"}, "show": True, "title": None})]),
    ("<|tool_call_start|>\nadd(a=2, b=3)\n<|tool_call_end|>", None, [ADD23]),  # no code fence
    ("<|thought_start|>\nNo tool is needed.\n<|thought_end|>\nHello! 2 < 3 and a<|b.", "Hello! 2 < 3 and a<|b.", []),
    ("The capital of France is Paris.", "The capital of France is Paris.", []),
]
JSON_OK = [
    (CALL, None, [ADD23]),
    ('Checking.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
     '<tool_call>\n{"name": "capital", "arguments": {"country": "Peru"}}\n</tool_call>',
     "Checking.", [ADD23, ("capital", {"country": "Peru"})]),
    ('<tool_call>{"name": "add", "parameters": {"a": 2, "b": 3}}</tool_call> Done.', "Done.", [ADD23]),
    ("Use <tool_calls> in <b>HTML</b>? No.", "Use <tool_calls> in <b>HTML</b>? No.", []),
]
# outputs that only look like calls: returned as content, unchanged, with no calls
MINICPM_MALFORMED = [
    "<|tool_call_start|>\n```python\nadd(a=2, b=\n```\n<|tool_call_end|>",
    "<|tool_call_start|>\n```python\nadd(a=2, b=3)\n```",
    "<|tool_call_start|>\nx = add\n<|tool_call_end|>",
    "<|thought_start|>\nstill thinking",
]
JSON_MALFORMED = [
    '<tool_call>\n{"name": "add", "arguments": {"a": 2,}}\n</tool_call>',
    "<tool_call>\n[1, 2]\n</tool_call>",
    '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}',
]
CASES = ([("minicpm", *c) for c in MINICPM_OK] + [("json", *c) for c in JSON_OK]
         + [("minicpm", t, t, []) for t in MINICPM_MALFORMED] + [("json", t, t, []) for t in JSON_MALFORMED])
WELL_FORMED = {text for text, _, _ in MINICPM_OK + JSON_OK}
MARKUP = re.compile(r"<\|(thought|tool_call)_|</?tool_call>|```")


def _calls(tool_calls):
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) and c["type"] == "function" for c in tool_calls)
    assert len({c["id"] for c in tool_calls}) == len(tool_calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls]


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parse_output(fmt, text, content, calls):
    got_content, got_calls = parse_output(text, TOOLS, fmt)
    assert got_content == content
    assert _calls(got_calls) == calls


def _stream(fmt, pieces):
    parser = StreamParser(fmt, TOOLS)
    events = [e for piece in pieces for e in parser.push(piece)] + parser.finish()
    content = "".join(v for k, v in events if k == "content")
    return events, content or None, _calls([v for k, v in events if k == "tool_call"])


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_stream_parser_agrees_for_every_piece_size(fmt, text, content, calls):
    for size in range(1, 6):
        events, got_content, got_calls = _stream(fmt, [text[i:i + size] for i in range(0, len(text), size)])
        assert (got_content, got_calls) == (content, calls), size
        if text in WELL_FORMED:
            assert not any(MARKUP.search(v) for k, v in events if k == "content"), (size, events)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_stream_parser_agrees_for_any_split(case, cuts):
    fmt, text, content, calls = case
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    assert _stream(fmt, [text[a:b] for a, b in zip(bounds, bounds[1:])])[1:] == (content, calls)


@pytest.mark.parametrize("fmt,text,error", [
    ("minicpm", "<|tool_call_start|>\nmultiply(a=2, b=3)\n<|tool_call_end|>", "unknown tool 'multiply'"),
    ("json", '<tool_call>\n{"name": "multiply", "arguments": {}}\n</tool_call>', "unknown tool 'multiply'"),
    ("minicpm", '<|tool_call_start|>\nadd(a="two", b=3)\n<|tool_call_end|>', "tool 'add': argument 'a': 'two' is not"),
    ("json", '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>', "'b' is a required property"),
    ("minicpm", "<|tool_call_start|>\nplot_points(points=[[1, 2]], show=1)\n<|tool_call_end|>", "argument 'show'"),
    ("minicpm", "<|tool_call_start|>\nadd(2, 3)\n<|tool_call_end|>", "name=value"),
    ("minicpm", '<|tool_call_start|>\nadd(a=os.system("ls"), b=1)\n<|tool_call_end|>',
     "tool 'add': argument 'a' is not a literal value: os.system"),
])
def test_bad_calls_raise_tool_call_error(fmt, text, error):
    with pytest.raises(ToolCallError, match=re.escape(error)):
        parse_output(text, TOOLS, fmt)


def test_python_arguments_are_never_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    text = (f'<|tool_call_start|>\nadd(a=__import__("pathlib").Path("{marker}").touch(), b=1)\n'
            "<|tool_call_end|>")
    with pytest.raises(ToolCallError, match="not a literal value"):
        parse_output(text, TOOLS, "minicpm")
    assert not marker.exists()


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3, and the capital of France?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
        {"id": "call_2", "type": "function", "function": {"name": "capital", "arguments": {"country": "France"}}},
        {"id": "call_3", "type": "function", "function": {"name": "plot-points", "arguments":
                                                          '{"points": [[1, 2]], "show": false, "title": null}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "tool", "tool_call_id": "call_2", "content": "Paris"},
    {"role": "tool", "tool_call_id": "call_3", "content": "drawn"},
]


@pytest.mark.parametrize("fmt", ["minicpm", "json"])
def test_render_then_parse_gives_back_the_calls(fmt):
    rendered = render_messages(CONVERSATION, TOOLS, "auto", fmt)
    assert all(set(m) == {"role", "content"} for m in rendered)
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\n")
    content, calls = parse_output(rendered[2]["content"], TOOLS, fmt)
    assert content == "Checking."
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in CONVERSATION[2]["tool_calls"]]
    assert _calls(calls) == [(n, json.loads(a) if isinstance(a, str) else a) for n, a in expected]
    if fmt == "minicpm":
        assert "def add(a: int, b: int):" in rendered[0]["content"] and "def plot_points(" in rendered[0]["content"]
        assert [m["role"] for m in rendered[3:]] == ["tool"] * 3 and rendered[4]["content"] == "Paris"
    else:
        assert json.dumps(CAPITAL, ensure_ascii=False) in rendered[0]["content"]
        results = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in ("5", "Paris", "drawn"))
        assert rendered[3] == {"role": "user", "content": results}


@pytest.mark.parametrize("choice,expect,absent", [
    ("auto", ["<tools>", '"name": "add"'], ["must call"]),
    (None, ["<tools>"], ["must call"]),
    ("required", ["<tools>", "You must call at least one function"], []),
    ({"type": "function", "function": {"name": "capital"}}, ["<tools>", "You must call the function capital"], []),
    ("none", [], ["<tools>", "must call"]),
])
def test_render_honours_tool_choice(choice, expect, absent):
    rendered = render_messages([{"role": "user", "content": "Hi"}], TOOLS, choice, "json")
    system = rendered[0]["content"] if rendered[0]["role"] == "system" else ""
    assert all(s in system for s in expect) and not any(s in system for s in absent)
    assert rendered[-1] == {"role": "user", "content": "Hi"}
    assert len(rendered) == (1 if choice == "none" else 2)


@pytest.mark.parametrize("messages,tools,choice,error", [
    ([*CONVERSATION[:2], {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": "{a: 2}"}}]}], TOOLS, "auto",
     "messages[2].tool_calls[0].function.arguments is not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], TOOLS, "auto",
     "messages[0].tool_calls[0].function.name must be a non-empty string"),
    ([{"role": "robot", "content": "hi"}], TOOLS, "auto", "messages[0].role must be one of"),
    ([{"role": "user", "content": None}], TOOLS, "auto", "messages[0].content must be a string"),
    ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {}}], "auto",
     "tools[0].function.name must be a non-empty string"),
    ([{"role": "user", "content": "hi"}], [ADD_TOOL, ADD_TOOL], "auto", "tools[1].function.name 'add' is already"),
    ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "objekt"}}}], "auto", "tools[0].function.parameters is not a valid"),
    ([{"role": "user", "content": "hi"}], TOOLS, {"type": "function", "function": {"name": "nope"}}, "'nope' is not"),
    ([{"role": "user", "content": "hi"}], None, "required", "tool_choice 'required' needs at least one tool"),
    ([{"role": "user", "content": "hi"}], TOOLS, "sometimes", "tool_choice must be"),
])
def test_render_rejects_bad_input_naming_the_field(messages, tools, choice, error):
    with pytest.raises(InputError, match=re.escape(error)):
        render_messages(messages, tools, choice, "json")


def test_detect_format_and_content_parts():
    assert detect_format(None, {"<|tool_call_start|>": 5, "a": 1}) == "minicpm"
    assert detect_format("{{ '<|tool_call_start|>' }}", set()) == "minicpm"
    assert detect_format("<|im_start|>", {"<tool_call>"}) == "json"
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert render_messages(parts, None, None, "json") == [{"role": "user", "content": "Hi there"}]
    assert check_tools(None) == {}


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_gguf):
    return minicpm4.load(smollm_gguf, dtype="bf16")[1]


@pytest.mark.parametrize("fmt", ["json", "minicpm"])
def test_render_through_the_default_models_chat_template(smollm_tokenizer, fmt):
    prompt = smollm_tokenizer.apply_chat_template(render_messages(CONVERSATION, TOOLS, "auto", fmt))
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n") and prompt.endswith("<|im_start|>assistant\n")
    if fmt == "json":
        assert json.dumps(ADD_TOOL) in prompt
        assert "<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\nParis" in prompt
        assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in prompt
    else:
        assert "def add(a: int, b: int):\n    \"\"\"Add two integers." in prompt
        assert "<|im_start|>tool\n5<|im_end|>\n<|im_start|>tool\nParis<|im_end|>" in prompt
        assert "<|tool_call_start|>\n```python\nadd(a=2,b=3)\ncapital(country=\"France\")" in prompt


def test_tiny_tool_model_calls_add_on_an_unseen_message(tool_model_dir):
    llm = minicpm4.LLM.load(tool_model_dir, dtype="fp32")
    messages = render_messages([{"role": "user", "content": "Could you work out the sum of my two numbers?"}],
                               [CAPITAL, ADD_TOOL], "auto", "json")
    params = minicpm4.SamplingParams(max_new_tokens=48)
    text = llm.chat(messages, params).text
    assert text == CALL
    content, calls = parse_output(text, [CAPITAL, ADD_TOOL], "json")
    assert content is None and _calls(calls) == [ADD23]
    # the same reply streamed token by token through the stream parser gives the same call
    assert _stream("json", llm.stream_ids(llm.encode_chat(messages), params))[1:] == (None, [ADD23])
