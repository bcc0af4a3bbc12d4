"""The int8 KV cache's effect on quality: perplexity of the default model over long KJV windows, bf16 vs int8 cache.

Each window of N tokens (the KJV from Genesis on, see bench_decode.prompt_text) is read in chunks of --chunk tokens
through a KV cache, as the engine prefills: every chunk attends to the cached keys and values of the chunks before it
(and its own), so with an int8 cache every attention read goes through the int8 rows. The loss is the mean
next-token negative log-likelihood over all N - 1 predictions; ppl = exp(loss). Same model, same windows, caches
alternated. The default model (SmolLM2-135M, bf16, dense attention through its C++ stack) was trained to 8K tokens,
so 16K windows read past its training length: the ppl there is high for both caches, and what matters is the ratio.

    python benchmarks/bench_kv8.py --lengths 4096,16384 --threads 1
The last stdout line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from bench_decode import prompt_text

import minicpm4
from minicpm4.model.kv_cache import KVCache
from minicpm4.model.native_stack import attach


@torch.inference_mode()
def mean_nll(model, ids: torch.Tensor, chunk: int, kv_dtype: str) -> float:
    """Mean next-token NLL of ids [N] read in chunks through a KV cache stored as kv_dtype."""
    n = ids.numel()
    cache = KVCache(model.config, 1, n, torch.bfloat16, kv_dtype=kv_dtype)
    total = 0.0
    for s in range(0, n, chunk):
        x = ids[s:s + chunk]
        logits = model(x[None], positions=torch.arange(s, s + x.numel())[None], cache=cache)[0]
        tgt = ids[s + 1:s + x.numel() + 1]
        total += F.cross_entropy(logits[:tgt.numel()], tgt, reduction="sum").item()
    return total / (n - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,16384", help="window lengths in tokens")
    ap.add_argument("--windows", type=int, default=1, help="windows per length (consecutive KJV text)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = minicpm4.load("default", dtype="bf16")
    attach(model)
    text, source = prompt_text()
    all_ids = torch.tensor(tok.encode(text))
    rows = []
    for n in (int(x) for x in a.lengths.split(",")):
        if all_ids.numel() < a.windows * n:
            raise SystemExit(f"the text has {all_ids.numel()} tokens, fewer than {a.windows} x {n}")
        nll = {"auto": [], "int8": []}
        t0 = time.perf_counter()
        for w in range(a.windows):
            for kv in nll:
                nll[kv].append(mean_nll(model, all_ids[w * n:(w + 1) * n], a.chunk, kv))
        row = {"length": n, "windows": a.windows, "ppl_bf16": math.exp(sum(nll["auto"]) / a.windows),
               "ppl_int8": math.exp(sum(nll["int8"]) / a.windows), "seconds": time.perf_counter() - t0}
        row["ratio"] = row["ppl_int8"] / row["ppl_bf16"]
        rows.append(row)
        print(f"{n:>6} tokens x {a.windows}: ppl bf16 cache {row['ppl_bf16']:.4f}  int8 cache {row['ppl_int8']:.4f}  "
              f"(x{row['ratio']:.4f})", flush=True)
    print(json.dumps({"bench": "kv8", "model": "default (SmolLM2-135M-Instruct), bf16", "text": source,
                      "chunk": a.chunk, "rows": rows, "threads": a.threads, "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
