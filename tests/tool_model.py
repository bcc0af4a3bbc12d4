"""build_tool_model: a tiny MiniCPM4 model, trained in seconds on CPU, that answers any user message rendered with
tools in the json format with exactly one call, then <|im_end|>:

    <tool_call>\\n{"name": "add", "arguments": {"a": 2, "b": 3}}\\n</tool_call>

Tool-calling tests (parser, server, agent) need a real model whose greedy output is a known call; no small
pretrained model is reliable enough for that, so this one is overfit on a few hundred rendered prompts: ADD_TOOL
always among the tools (with zero to two others, in any order), with or without a system message, any
tool_choice, and user messages that are English-like word salad or decoded random tokens, so that what the
user says cannot matter. It uses the default model's tokenizer and chat template (SmolLM2's ChatML) and
MiniCPM4's muP multipliers; fp32 throughout.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

import minicpm4
from minicpm4.config import ModelConfig
from minicpm4.llm import LLM
from minicpm4.model import MiniCPM4ForCausalLM
from minicpm4.tools import render_messages


def _fn(name: str, description: str, **props: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": t} for k, t in props.items()}, "required": list(props)}}}


ADD_TOOL = _fn("add", "Add two integers.", a="integer", b="integer")
OTHER_TOOLS = [_fn("capital", "The capital city of a country.", country="string"),
               _fn("get_weather", "Current weather in a city.", city="string"),
               _fn("search", "Search the web.", query="string", limit="integer")]
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
WORDS = ("what is the sum of two and three please add these numbers weather in Paris today hello tell me a story "
         "about capital France how much compute 2 3 5 + plus can you help I need answer quickly why who when "
         "where search for news find calculate total result thanks").split()
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a calculator bot. Use tools."]


def _user_message(rng: random.Random, vocab_size: int, tokenizer) -> str:
    if rng.random() < 0.5:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) + rng.choice("?.! ")
    text = tokenizer.decode([rng.randrange(200, vocab_size) for _ in range(rng.randint(1, 10))])
    return text.replace("<|", "<")  # never a special token: users type text


def _prompts(rng: random.Random, n: int, tokenizer) -> list[list[dict]]:
    prompts = []
    for _ in range(n):
        tools = [ADD_TOOL] + rng.sample(OTHER_TOOLS, rng.randint(0, 2))
        rng.shuffle(tools)
        system = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.4 else []
        user = [{"role": "user", "content": _user_message(rng, tokenizer.vocab_size, tokenizer)}]
        choice = rng.choice(["auto", "required", None, {"type": "function", "function": {"name": "add"}}])
        prompts.append(render_messages(system + user, tools, choice, "json"))
    return prompts


def build_tool_model(out_dir: str | Path, tokenizer_source: str | Path, steps: int = 300) -> Path:
    """Train the model (about 10 s) and write it as a Hugging Face directory at out_dir (absent or empty)."""
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
    target = tokenizer.encode(CALL + "<|im_end|>")
    samples = [torch.tensor([encode(m) + target]) for m in _prompts(rng, 256, tokenizer)]
    labels = torch.tensor(target)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    # These matmuls are tiny: with a second thread, waiting on it costs far more than it saves (20x measured
    # on 2 shared cores).
    torch.set_num_threads(1)
    try:
        model.train()
        for step in range(steps):
            ids = samples[step % len(samples)]
            # only the reply is learned: the last len(target) positions predict the target tokens
            logits = model(ids[:, :-1], logits_to_keep=len(target))[0]
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return minicpm4.save_pretrained(model, tokenizer, out_dir)
