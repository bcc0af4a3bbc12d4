"""KV-cache memory at long contexts: what an engine with 16 slots of 32K or 128K tokens takes, idle, with a few
requests running, and after they end (minicpm4/lazy_memory.py: pages are committed as tokens are written and a
finished request's pages go back).

The default model as `serve` runs it (int4 layers, bf16 keys and values). Per context length: a fresh Engine
with --slots rows; RSS of the process (VmRSS) and the RAM committed to the cache's mappings (their Rss in
/proc/self/smaps) after the model load, with the cache made (idle), once --requests prompts of --prompt-tokens
KJV tokens have prefilled and decoded a few tokens, and after they end; beside them, what a cache allocated in
full (slots x context x bytes per token, the layout before lazy commitment) would take. Last stdout line: one
JSON object.

    python benchmarks/bench_kv_memory.py --lengths 32768,131072 --slots 16 --requests 4 --prompt-tokens 1000
"""

from __future__ import annotations

import argparse
import json

import torch

from minicpm4.corpus import kjv_verses
from minicpm4.engine.engine import Engine
from minicpm4.engine.kv_budget import bytes_per_token
from minicpm4.engine.sampling import SamplingParams
from minicpm4.lazy_memory import committed_bytes
from minicpm4.serve.llm import LLM

MiB = 2**20


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def kv_committed(engine: Engine) -> int:
    c = engine._cache
    comp = c.compressed
    extra = [] if comp is None else [*comp.c, *([comp.k_nope] if comp.k_nope is not None else [])]
    return committed_bytes([c.k, c.v, *extra]) or 0


def measure(llm: LLM, length: int, slots: int, prompts: list[list[int]], new_tokens: int) -> dict:
    engine = Engine(llm.model, max_len=length, max_slots=slots, boundary_ids=llm.tokenizer.special_ids)
    before = rss()
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts]
    engine._ensure_cache(1, 1)
    idle = {"rss_mib": rss() / MiB, "kv_committed_mib": kv_committed(engine) / MiB}
    while not all(len(r.out.token_ids) >= new_tokens // 2 for r in reqs):
        engine.step()
    busy = {"rss_mib": rss() / MiB, "kv_committed_mib": kv_committed(engine) / MiB}
    while engine.has_work:
        engine.step()
    after = {"rss_mib": rss() / MiB, "kv_committed_mib": kv_committed(engine) / MiB}
    per_token = bytes_per_token(llm.model.config, engine.dtype)
    tokens = sum(len(p) + new_tokens // 2 for p in prompts)
    return {"max_model_len": length, "slots": slots, "rss_before_mib": before / MiB, "idle": idle,
            "running": busy, "after": after, "tokens_running": tokens,
            "tokens_x_bytes_mib": tokens * per_token / MiB,
            "virtual_mib": 2 * engine._cache.k.numel() * engine._cache.k.element_size() / MiB,
            "full_allocation_mib": slots * length * per_token / MiB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM.load(None, int4=True)
    text = " ".join(v for _, v in kjv_verses(2000))
    ids = llm.tokenizer.encode(text)
    prompts = [ids[i * 50:i * 50 + args.prompt_tokens] for i in range(args.requests)]
    rows = [measure(llm, int(n), args.slots, prompts, args.new_tokens) for n in args.lengths.split(",")]
    print(f"{'context':>8} {'slots':>5} {'full alloc':>11} {'idle KV':>8} {'running KV':>11} {'(tokens x B)':>13} "
          f"{'after KV':>9} {'RSS idle/running/after':>24}  (MiB)")
    for r in rows:
        print(f"{r['max_model_len']:8d} {r['slots']:5d} {r['full_allocation_mib']:11.0f} "
              f"{r['idle']['kv_committed_mib']:8.1f} {r['running']['kv_committed_mib']:11.1f} "
              f"{r['tokens_x_bytes_mib']:13.1f} {r['after']['kv_committed_mib']:9.1f} "
              f"{r['idle']['rss_mib']:8.0f}/{r['running']['rss_mib']:.0f}/{r['after']['rss_mib']:.0f}")
    print(json.dumps({"requests": args.requests, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                      "rows": rows}))


if __name__ == "__main__":
    main()
