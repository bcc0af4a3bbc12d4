"""Needle in a haystack with the default model: does InfLLM v2 sparse attention keep dense attention's retrieval?

A haystack of real text (KJV verses, see bench_decode.prompt_text) of about N tokens gets one sentence, "The magic
number is DDDDD.", at a relative depth; the user turn then asks for the number and the assistant reply is primed
with "The magic number is" (answer-prefix prompting, usual for small models). A trial passes when the greedy reply's
first digits are the needle's. Each context length runs every depth with:

  dense          SDPA over every key
  sparse         the default sparse_config with dense_len lowered to 1024 (so sparse is on): 96 blocks of 64
                 keys = 6144 keys per query, i.e. every key below ~6K (sparse = dense at 2K and 4K, by the rule)
  sparse-tight   topk 16, window 512: 24 blocks = 1536 keys per query, so the selection decides at every length

The model is SmolLM2-135M-Instruct (trained to 8K); one model, backends switched between runs; prompts are
prefilled in chunks of 512 through the engine, as generation does (chunks past dense_len run sparse).

    python benchmarks/needle.py                    # 2K, 4K, 8K; depths 0.1, 0.5, 0.9
    python benchmarks/needle.py --quick            # 2K only, depth 0.5
    python benchmarks/needle.py --kv-int8          # each setting also on an int8 KV cache (name-int8)
The last stdout line is one JSON object with every trial.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import time

import torch
from bench_decode import prompt_text

import minicpm4
from minicpm4.config import SPARSE_DEFAULTS
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.model.decoder import dense_attention
from minicpm4.model.native_stack import attach
from minicpm4.serve.llm import LLM
from minicpm4.sparse.attention import make_backend

SETTINGS = {
    "dense": None,
    "sparse": dict(SPARSE_DEFAULTS, dense_len=1024),
    "sparse-tight": dict(SPARSE_DEFAULTS, dense_len=1024, topk=16, window_size=512),
}
ANSWER_PREFIX = "The magic number is"


def build_prompt(llm: LLM, hay_ids: list[int], n_tokens: int, depth: float, number: int) -> list[int]:
    """Chat prompt of about n_tokens: haystack with the needle at `depth`, the question, the answer prefix."""
    needle = f" The magic number is {number}. "
    question = "\n\nWhat is the magic number mentioned in the text above?"
    tok = llm.tokenizer
    overhead = len(llm.encode_chat([{"role": "user", "content": needle + question}])) + 8
    body = hay_ids[:max(n_tokens - overhead, 0)]
    cut = int(len(body) * depth)
    text = tok.decode(body[:cut]) + needle + tok.decode(body[cut:]) + question
    return llm.encode_chat([{"role": "user", "content": text}]) + tok.encode(ANSWER_PREFIX)


def use(llm: LLM, setting: dict | None, kv_cache_dtype: str = "auto") -> None:
    """Switch the model's attention and give it a fresh engine (its KV cache follows the config)."""
    model = llm.model
    model.config = dataclasses.replace(model.config, sparse_config=setting)
    model.set_attention_backend(dense_attention if setting is None else make_backend(setting))
    attach(model)  # the C++ decode stack for this backend
    llm.engine = Engine(model, prefill_chunk=512, kv_cache_dtype=kv_cache_dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8192", help="context lengths in tokens")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle positions, 0 = start, 1 = end")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="which of: " + ", ".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2K context, depth 0.5")
    ap.add_argument("--kv-int8", action="store_true", help="run each setting on an int8 KV cache too (name-int8)")
    a = ap.parse_args()
    if a.quick:
        a.lengths, a.depths = "2048", "0.5"
    torch.set_num_threads(a.threads)
    model, tok = minicpm4.load("default", dtype="bf16")
    llm = LLM(attach(model), tok)
    text, source = prompt_text()
    hay_ids = tok.encode(text)
    rng = random.Random(0)
    lengths = [int(x) for x in a.lengths.split(",")]
    depths = [float(x) for x in a.depths.split(",")]
    names = [n + kv for n in a.settings.split(",") for kv in (("", "-int8") if a.kv_int8 else ("",))]
    trials, params = [], SamplingParams(max_new_tokens=8)
    for n in lengths:
        for depth in depths:
            number = rng.randrange(10000, 100000)
            prompt = build_prompt(llm, hay_ids, n, depth, number)
            for name in names:
                use(llm, SETTINGS[name.removesuffix("-int8")], "int8" if name.endswith("-int8") else "auto")
                t0 = time.perf_counter()
                reply = tok.decode(llm.engine.generate([prompt], params)[0].token_ids)
                found = re.search(r"\d[\d,]*", reply)
                ok = found is not None and found.group().replace(",", "") == str(number)
                trials.append({"length": n, "prompt_tokens": len(prompt), "depth": depth, "setting": name,
                               "number": number, "reply": reply, "ok": ok, "seconds": time.perf_counter() - t0})
                print(f"  {n:>5} depth {depth:.1f} {name:<13} {'ok ' if ok else 'MISS'} {reply!r}", flush=True)
    print(f"\nneedle in a haystack, default model, haystack: {source}; accuracy (passed / trials)")
    print(f"{'context':>8}" + "".join(f"{name:>15}" for name in names))
    table = {}
    for n in lengths:
        row = table[str(n)] = {}
        for name in names:
            runs = [t["ok"] for t in trials if t["length"] == n and t["setting"] == name]
            row[name] = sum(runs) / len(runs)
        print(f"{n:>8}" + "".join(f"{sum(t['ok'] for t in trials if t['length'] == n and t['setting'] == nm):>12}/"
                                   f"{len(depths):<2}" for nm in names))
    print(json.dumps({"bench": "needle", "model": "default (SmolLM2-135M-Instruct)", "haystack": source,
                      "settings": {k: SETTINGS[k.removesuffix("-int8")] for k in names}, "accuracy": table, "trials": trials,
                      "threads": a.threads, "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
