"""Speculative decode speed on CPU: our plain decode against EAGLE-2 speculative decoding (with and without FR-Spec)
and llama.cpp, on the default model, 2 threads, greedy, EOS ignored.

Peers, same prompt token ids (the first --length tokens of the KJV text bench_decode.py uses):
  plain          Engine.stream on the fused bf16 model (what LLM.load gives)
  spec           SpeculativeDecoder with the EAGLE draft --draft (tree --tree topk,num_iter,tree_size)
  spec-frspec    the same draft with its head restricted to the --frspec vocabulary
  llama.cpp      llama-cpp-python on the default GGUF (same weights), as bench_decode.py runs it
Decode speed = (new_tokens - 1) / (time from the first to the last token), as in bench_decode.py; the speculative
peers also report the mean acceptance length (tokens committed per target forward, bonus token included) and how
many leading tokens equal plain greedy's. Runs are interleaved across peers; medians. Last line: JSON.

The draft comes from (see BENCHMARKS.md for the numbers):
    python benchmarks/kjv_corpus.py --skip 2000 --verses 10000 -o kjv_train.txt
    minicpm4 frspec --corpus kjv_train.txt --size 4096 -o freq_4096.pt
    minicpm4 train draft --data kjv_train.txt --frspec freq_4096.pt -o draft_kjv --steps 150 --max-windows 32
    python benchmarks/bench_spec.py --draft draft_kjv --frspec freq_4096.pt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import minicpm4
from bench_decode import THREADS, agree, cpu_name, default_gguf, llamacpp_runner, prompt_text
from minicpm4.engine import Engine
from minicpm4.sampling import SamplingParams
from minicpm4.speculative import build_speculative


def stream_runner(decoder):
    """(prompt, n) -> (decode tok/s, mean acceptance or None, tokens) for Engine or SpeculativeDecoder."""
    def run(prompt: list[int], n: int):
        stream = decoder.stream(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
        tokens = [next(stream)]
        t1 = time.perf_counter()
        while True:
            try:
                tokens.append(next(stream))
            except StopIteration as end:
                gen = end.value
                break
        dt = time.perf_counter() - t1
        return (len(tokens) - 1) / dt, getattr(gen, "mean_accept_length", None), tokens
    return run


def llamacpp_stream(gguf, n_ctx):
    run = llamacpp_runner(gguf, n_ctx)

    def wrapped(prompt, n):
        _, decode_s, tokens = run(prompt, n)
        return 1 / decode_s, None, tokens
    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", required=True, help="EAGLE draft directory (minicpm4 train draft)")
    ap.add_argument("--frspec", default=None, help="FR-Spec vocabulary file (adds the spec-frspec peer)")
    ap.add_argument("--tree", default="10,2,12", help="topk,num_iter,tree_size (CPM.cu's defaults)")
    ap.add_argument("--length", type=int, default=512, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--quick", action="store_true", help="128-token prompt, 32 new tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.length, args.new_tokens, args.repeats = 128, 32, 1
    torch.set_num_threads(THREADS)
    topk, num_iter, tree_size = (int(x) for x in args.tree.split(","))
    spec_opts = {"topk": topk, "num_iter": num_iter, "tree_size": tree_size}

    model, tok = minicpm4.load("default", dtype="bf16")
    model.fuse_projections()
    text, source = prompt_text()
    prompt = tok.encode(text)[:args.length]
    runners = {"plain": stream_runner(Engine(model)),
               "spec": stream_runner(build_speculative(model, args.draft, None, spec_opts))}
    if args.frspec:
        runners["spec-frspec"] = stream_runner(build_speculative(model, args.draft, args.frspec, spec_opts))
    notes = []
    if not args.skip_llamacpp:
        try:
            runners["llama.cpp"] = llamacpp_stream(default_gguf(), args.length + args.new_tokens + 8)
        except ImportError as e:
            notes.append(f"llama.cpp skipped: {e}")
    load_before = os.getloadavg()[0]
    print(f"default model bf16; peers {', '.join(runners)}; {THREADS} threads; prompt {len(prompt)} tokens of "
          f"{source}; {args.new_tokens} new tokens; tree {spec_opts}; median of {args.repeats} after 1 warm-up; "
          f"load average {load_before:.1f}", flush=True)
    runs: dict[str, list] = {name: [] for name in runners}
    for i in range(args.repeats + 1):
        for name, run in runners.items():
            r = run(prompt, args.new_tokens)
            if i > 0:
                runs[name].append(r)
    results = {}
    base = runs["plain"][0][2]
    for name, rs in runs.items():
        speed = statistics.median(r[0] for r in rs)
        acc = [r[1] for r in rs if r[1] is not None]
        results[name] = {"decode_tok_s": speed, "decode_tok_s_runs": [r[0] for r in rs],
                         "mean_accept_length": statistics.median(acc) if acc else None,
                         "tokens_agree_with_plain": agree(rs[0][2], base)}
    for name in results:
        results[name]["vs_plain"] = results[name]["decode_tok_s"] / results["plain"]["decode_tok_s"]
        if "llama.cpp" in results:
            results[name]["vs_llama.cpp"] = results[name]["decode_tok_s"] / results["llama.cpp"]["decode_tok_s"]
    print(f"\n{'peer':<13}{'decode tok/s':>13}{'x plain':>9}{'x llama.cpp':>13}{'accept len':>12}{'agree':>9}")
    for name, r in results.items():
        acc = "-" if r["mean_accept_length"] is None else f"{r['mean_accept_length']:.2f}"
        vs_l = f"{r['vs_llama.cpp']:.2f}" if "vs_llama.cpp" in r else "-"
        print(f"{name:<13}{r['decode_tok_s']:>13.1f}{r['vs_plain']:>9.2f}{vs_l:>13}{acc:>12}"
              f"{r['tokens_agree_with_plain']:>5}/{args.new_tokens}")
    for note in notes:
        print("NOTE:", note)
    print(json.dumps({"cpu": cpu_name(), "threads": THREADS, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "tree": spec_opts, "draft": args.draft, "frspec": args.frspec,
                      "loadavg_1min": [load_before, os.getloadavg()[0]], "notes": notes, "results": results}))


if __name__ == "__main__":
    main()
