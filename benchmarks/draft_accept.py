"""Draft quality on held-out text: mean acceptance length of EAGLE drafts, compared in one run on the same prompts.

Prompts: --prompts windows of --length tokens, evenly spaced over the KJV verses 1-2000 that bench_decode.py and
bench_spec.py read (draft training text comes from verses 2001+, see kjv_corpus.py). Each draft decodes
--new-tokens greedy tokens per prompt through SpeculativeDecoder (tree --tree topk,num_iter,tree_size) on the default
model; acceptance length = tokens committed per target verification pass, bonus token included (1.0 = the draft
never helps). Timing-free, so the load of the machine does not change the result. Last line: JSON.

    python benchmarks/draft_accept.py --frspec freq_4096.pt DRAFT_DIR [DRAFT_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from bench_decode import THREADS, prompt_text

import minicpm4
from minicpm4.engine.sampling import SamplingParams
from minicpm4.spec.decoder import build_speculative


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("drafts", nargs="+", help="EAGLE draft directories")
    ap.add_argument("--frspec", default=None, help="FR-Spec vocabulary file for every draft")
    ap.add_argument("--tree", default="10,2,12", help="topk,num_iter,tree_size")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--length", type=int, default=256, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--int4", action="store_true", help="target = the default GGUF's Q4_1 weights")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    topk, num_iter, tree_size = (int(x) for x in args.tree.split(","))
    opts = {"topk": topk, "num_iter": num_iter, "tree_size": tree_size}
    model, tok = minicpm4.load("default", dtype="bf16", int4=args.int4)
    model.fuse_projections()
    ids = tok.encode(prompt_text()[0])
    span = len(ids) - args.length
    prompts = [ids[span * i // args.prompts:][:args.length] for i in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    results = {}
    for d in args.drafts:
        spec = build_speculative(model, d, args.frspec, opts)
        per_prompt = [g.mean_accept_length for g in spec.generate(prompts, params)]
        results[d] = {"mean_accept_length": statistics.mean(per_prompt), "per_prompt": per_prompt}
        print(f"{d}: mean acceptance {results[d]['mean_accept_length']:.2f} "
              f"(per prompt {', '.join(f'{a:.2f}' for a in per_prompt)})", flush=True)
    print(json.dumps({"prompts": args.prompts, "prompt_tokens": args.length, "new_tokens": args.new_tokens,
                      "tree": opts, "frspec": args.frspec, "int4": args.int4, "results": results}))


if __name__ == "__main__":
    main()
