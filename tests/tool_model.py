"""build_tool_model: a tiny MiniCPM4 model, trained in seconds on CPU, that plays both turns of a tool call in the
json format, each followed by <|im_end|>:

- first turn: any user message rendered with tools -> exactly one call, CALL:
      <tool_call>\\n{"name": "add", "arguments": {"a": 2, "b": 3}}\\n</tool_call>
- second turn: a conversation that ends with a tool result (the <tool_response> user message) -> exactly
  ANSWER ("The tool says: done."), whatever the result says.

Tool-calling tests (parser, server, agent) need a real model whose greedy output is known; no small pretrained
model is reliable enough for that, so this one is overfit on a few hundred rendered prompts: ADD_TOOL always
among the tools (with zero to two others, in any order), written as a client writes specs or as an MCP server
lists them (with "title"s), with or without a system message, any tool_choice, and user messages and tool
results that are English-like word salad, numbers, JSON or decoded random tokens, so that what the user or the
tool says cannot matter. Second-turn prompts also come without tools (a client may leave them out of the
follow-up request). It uses the default model's tokenizer and chat template (SmolLM2's ChatML) and MiniCPM4's
muP multipliers; fp32 throughout.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import minicpm4
from minicpm4.config import ModelConfig
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.serve.llm import LLM
from minicpm4.text.tool_calls import render_messages


def _fn(name: str, description: str, **props: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": t} for k, t in props.items()}, "required": list(props)}}}


ADD_TOOL = _fn("add", "Add two integers.", a="integer", b="integer")
OTHER_TOOLS = [_fn("capital", "The capital city of a country.", country="string"),
               _fn("get_weather", "Current weather in a city.", city="string"),
               _fn("search", "Search the web.", query="string", limit="integer")]
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
ANSWER = "The tool says: done."
WORDS = ("what is the sum of two and three please add these numbers weather in Paris today hello tell me a story "
         "about capital France how much compute 2 3 5 + plus can you help I need answer quickly why who when "
         "where search for news find calculate total result thanks").split()
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a calculator bot. Use tools."]


def _user_message(rng: random.Random, vocab_size: int, tokenizer) -> str:
    if rng.random() < 0.5:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) + rng.choice("?.! ")
    return _random_text(rng, vocab_size, tokenizer)


def _random_text(rng: random.Random, vocab_size: int, tokenizer) -> str:
    text = tokenizer.decode([rng.randrange(200, vocab_size) for _ in range(rng.randint(1, 10))])
    return text.replace("<|", "<")  # never a special token: users (and tools) write text


def _tool_result(rng: random.Random, vocab_size: int, tokenizer) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randint(-1000, 100000))
    if kind == 1:
        return json.dumps({rng.choice(WORDS): rng.choice([rng.randint(0, 99), rng.choice(WORDS)])})
    if kind == 2:
        return ("error: " if rng.random() < 0.3 else "") + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
    return _random_text(rng, vocab_size, tokenizer)


def _mcp_style(tool: dict) -> dict:
    """The spec as an MCP server lists it (what MCPTools.specs holds): titles on the schema and its fields."""
    fn = tool["function"]
    params = fn["parameters"]
    props = {k: {"title": k.title(), **v} for k, v in params["properties"].items()}
    return {"type": "function", "function": {**fn, "parameters": {
        "properties": props, "required": params["required"], "type": "object", "title": fn["name"] + "Arguments"}}}


def _call(name: str, arguments: dict, rng: random.Random) -> dict:
    return {"id": f"call_{rng.getrandbits(48):012x}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def _prompts(rng: random.Random, n: int, tokenizer, second_turn: bool) -> list[list[dict]]:
    """n rendered conversations that end with a user message (first turn) or with tool results (second)."""
    prompts = []
    vocab = tokenizer.vocab_size
    for _ in range(n):
        tools = [ADD_TOOL] + rng.sample(OTHER_TOOLS, rng.randint(0, 2))
        rng.shuffle(tools)
        if rng.random() < 0.3:
            tools = [_mcp_style(t) for t in tools]
        system = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.4 else []
        user = [{"role": "user", "content": _user_message(rng, vocab, tokenizer)}]
        choice = rng.choice(["auto", "required", None, {"type": "function", "function": {"name": "add"}}])
        if not second_turn:
            prompts.append(render_messages(system + user, tools, choice, "json"))
            continue
        # the call the model made (mostly add(2, 3), as it does), then one or two results
        calls = [_call("add", {"a": 2, "b": 3}, rng) if rng.random() < 0.7 else
                 _call("add", {"a": rng.randint(-50, 50), "b": rng.randint(-50, 50)}, rng)]
        if rng.random() < 0.2:
            calls.append(_call("add", {"a": rng.randint(0, 9), "b": rng.randint(0, 9)}, rng))
        results = [{"role": "tool", "tool_call_id": c["id"], "content": _tool_result(rng, vocab, tokenizer)}
                   for c in calls]
        turn = [{"role": "assistant", "content": None, "tool_calls": calls}] + results
        if rng.random() < 0.25:  # a follow-up request without tools
            tools, choice = None, None
        elif rng.random() < 0.15:
            choice = "none"
        prompts.append(render_messages(system + user + turn, tools, choice, "json"))
    return prompts


def build_tool_model(out_dir: str | Path, tokenizer_source: str | Path, steps: int = 480) -> Path:
    """Train the model (about 15 s) and write it as a Hugging Face directory at out_dir (absent or empty)."""
    torch.manual_seed(0)
    rng = random.Random(0)
    base, tokenizer = minicpm4.load(tokenizer_source, dtype="bf16")
    special = {k: getattr(base.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    del base
    config = ModelConfig.from_dict(dict(
        model_type="minicpm", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        scale_emb=12, scale_depth=1.4, dim_model_base=16, tie_word_embeddings=True, **special))
    model = MiniCPM4ForCausalLM(config)  # PyTorch's default init, fp32
    # prompts are encoded exactly as LLM.chat encodes them at test time (template, BOS rule)
    encode = LLM(model, tokenizer).encode_chat
    samples = []  # (prompt + reply ids, reply ids): first turns and second turns, interleaved
    for second_turn, reply in ((False, CALL), (True, ANSWER)):
        target = tokenizer.encode(reply + "<|im_end|>")
        samples += [(torch.tensor([encode(m) + target]), torch.tensor(target))
                    for m in _prompts(rng, 240, tokenizer, second_turn)]
    rng.shuffle(samples)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    # These matmuls are tiny: with a second thread, waiting on it costs far more than it saves (20x measured
    # on 2 shared cores).
    torch.set_num_threads(1)
    try:
        model.train()
        for step in range(steps):
            ids, labels = samples[step % len(samples)]
            # only the reply is learned: the last len(labels) positions predict the reply tokens
            logits = model(ids[:, :-1], logits_to_keep=len(labels))[0]
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return minicpm4.save_pretrained(model, tokenizer, out_dir)
