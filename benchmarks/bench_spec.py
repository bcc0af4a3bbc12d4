"""Speculative decode speed on CPU: our plain decode against EAGLE-2 speculative decoding (with and without FR-Spec)
and llama.cpp, on the default model, 2 threads, greedy, EOS ignored.

Peers, same prompt token ids (the first --length tokens of the KJV text bench_decode.py uses):
  plain          Engine.stream on the fused model (what LLM.load gives): bf16, or with --int4 the default GGUF's
                 Q4_1 weights kept quantized (our fastest plain decode; the same weights llama.cpp runs)
  spec           SpeculativeDecoder on the same target with the EAGLE draft --draft (tree --tree topk,num_iter,
                 tree_size), full-vocabulary draft head
  spec-frspec    the same draft with its head restricted to the --frspec vocabulary
  spec-frspec-py with --ablate: spec-frspec with the target's verification pass and the draft layer on the Python
                 layers instead of the C++ stack (what the native T > 1 pass gives)
  llama.cpp      llama-cpp-python on the default GGUF (same weights), as bench_decode.py runs it
Decode speed = (new_tokens - 1) / (time from the first to the last token), as in bench_decode.py; the speculative
peers also report the mean acceptance length (tokens committed per target forward, bonus token included), the
time per round spent drafting and verifying, and how many leading tokens equal plain greedy's. Runs are
interleaved across peers; medians. Before the peers, one 1-token decode step and one 12-token tree verification
pass of the target are timed at the prompt's length. Last line: JSON.

The draft comes from (see BENCHMARKS.md for the numbers and the exact commands):
    python benchmarks/kjv_corpus.py --skip 2000 --verses 10000 -o kjv_train.txt
    minicpm4 frspec --corpus kjv_train.txt --size 4096 -o freq_4096.pt
    minicpm4 train draft-data --data kjv_train.txt -o selfdistill_kjv.txt
    minicpm4 train draft --data selfdistill_kjv.txt --frspec freq_4096.pt -o draft_sd
    python benchmarks/bench_spec.py --draft draft_sd --frspec freq_4096.pt --int4 --ablate
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import bench_decode
import torch
from bench_decode import THREADS, agree, cpu_name, default_gguf, drain, llamacpp_runner, prompt_text

import minicpm4
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.spec.decoder import build_speculative


def stream_runner(decoder, python_layers=None):
    """(prompt, n) -> (decode tok/s, mean acceptance or None, tokens, ms per round drafting / verifying or None)
    for Engine or SpeculativeDecoder. python_layers: (target, draft) whose C++ stacks are off during the run."""
    def run(prompt: list[int], n: int):
        saved = [(m, m.native) for m in python_layers or ()]
        for m, _ in saved:
            m.native = None
        try:
            return timed(prompt, n)
        finally:
            for m, native in saved:
                m.native = native

    def timed(prompt: list[int], n: int):
        tokens, gen, _, dt = drain(decoder.stream(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)))
        rounds = len(getattr(gen, "accepted", ())) or None
        split = rounds and (1e3 * gen.draft_s / rounds, 1e3 * gen.verify_s / rounds)
        return (len(tokens) - 1) / dt, getattr(gen, "mean_accept_length", None), tokens, split
    return run


@torch.inference_mode()
def pass_times(model, prompt: list[int], tree_size: int, repeats: int = 10) -> tuple[float, float]:
    """Median ms of one 1-token decode step and of one tree_size-token verification pass (a chain-shaped tree)
    after the prompt."""
    from minicpm4.model.kv_cache import KVCache
    from minicpm4.spec.tree import causal_mask
    n = len(prompt)
    cache = KVCache(model.config, 1, n + tree_size, next(model.parameters()).dtype)
    model.forward_masked(torch.tensor([prompt]), torch.arange(n)[None], cache, 0, causal_mask(n, 0)[None])
    tokens = torch.tensor([prompt[-tree_size:]])
    step, verify = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(tokens[:, :1], positions=torch.tensor([[n - 1]]), cache=cache, logits_to_keep=1)
        t1 = time.perf_counter()
        model.forward_masked(tokens, torch.arange(n - 1, n - 1 + tree_size)[None], cache, n - 1,
                             causal_mask(tree_size, n - 1)[None])
        step.append(t1 - t0)
        verify.append(time.perf_counter() - t1)
    return 1e3 * statistics.median(step), 1e3 * statistics.median(verify)


def llamacpp_stream(gguf, n_ctx):
    run = llamacpp_runner(gguf, n_ctx)

    def wrapped(prompt, n):
        _, decode_s, tokens = run(prompt, n)
        return 1 / decode_s, None, tokens, None
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
    ap.add_argument("--int4", action="store_true", help="target = the default GGUF's Q4_1 weights kept quantized")
    ap.add_argument("--ablate", action="store_true", help="add spec-frspec on the Python layers (no C++ stack)")
    ap.add_argument("--no-full-head", action="store_true", help="skip the full-vocabulary-head spec peer")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch threads (1 on a loaded machine: 2 threads stall at every OpenMP barrier)")
    ap.add_argument("--quick", action="store_true", help="128-token prompt, 32 new tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.length, args.new_tokens, args.repeats = 128, 32, 1
    torch.set_num_threads(args.threads)
    bench_decode.THREADS = args.threads  # llama.cpp's n_threads
    topk, num_iter, tree_size = (int(x) for x in args.tree.split(","))
    spec_opts = {"topk": topk, "num_iter": num_iter, "tree_size": tree_size}

    model, tok = minicpm4.load("default", dtype="bf16", int4=args.int4)
    model.fuse_projections()
    weights = "int4 (GGUF Q4_1)" if args.int4 else "bf16"
    text, source = prompt_text()
    prompt = tok.encode(text)[:args.length]
    runners = {"plain": stream_runner(Engine(model))}
    if not args.no_full_head:
        runners["spec"] = stream_runner(build_speculative(model, args.draft, None, spec_opts))
    if args.frspec:
        fr = build_speculative(model, args.draft, args.frspec, spec_opts)
        runners["spec-frspec"] = stream_runner(fr)
        if args.ablate:
            runners["spec-frspec-py"] = stream_runner(fr, python_layers=(model, fr.drafter.draft))
    notes = []
    if not args.skip_llamacpp:
        try:
            runners["llama.cpp"] = llamacpp_stream(default_gguf(), args.length + args.new_tokens + 8)
        except ImportError as e:
            notes.append(f"llama.cpp skipped: {e}")
    load_before = os.getloadavg()[0]
    step_ms, verify_ms = pass_times(model, prompt, tree_size)
    print(f"target passes at {len(prompt)} tokens: 1-token decode step {step_ms:.1f} ms, {tree_size}-token "
          f"verification {verify_ms:.1f} ms ({verify_ms / step_ms:.2f}x)", flush=True)
    print(f"default model {weights}; peers {', '.join(runners)}; {args.threads} threads; prompt {len(prompt)} tokens of "
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
        split = [r[3] for r in rs if r[3]]
        results[name] = {"decode_tok_s": speed, "decode_tok_s_runs": [r[0] for r in rs],
                         "mean_accept_length": statistics.median(acc) if acc else None,
                         "draft_ms_per_round": statistics.median(x[0] for x in split) if split else None,
                         "verify_ms_per_round": statistics.median(x[1] for x in split) if split else None,
                         "tokens_agree_with_plain": agree(rs[0][2], base)}
    for name in results:
        results[name]["vs_plain"] = results[name]["decode_tok_s"] / results["plain"]["decode_tok_s"]
        if "llama.cpp" in results:
            results[name]["vs_llama.cpp"] = results[name]["decode_tok_s"] / results["llama.cpp"]["decode_tok_s"]
    print(f"\n{'peer':<15}{'decode tok/s':>13}{'x plain':>9}{'x llama.cpp':>13}{'accept len':>12}"
          f"{'draft/verify ms':>17}{'agree':>9}")
    for name, r in results.items():
        acc = "-" if r["mean_accept_length"] is None else f"{r['mean_accept_length']:.2f}"
        vs_l = f"{r['vs_llama.cpp']:.2f}" if "vs_llama.cpp" in r else "-"
        split = "-" if r["draft_ms_per_round"] is None else f"{r['draft_ms_per_round']:.1f}/{r['verify_ms_per_round']:.1f}"
        print(f"{name:<15}{r['decode_tok_s']:>13.1f}{r['vs_plain']:>9.2f}{vs_l:>13}{acc:>12}{split:>17}"
              f"{r['tokens_agree_with_plain']:>5}/{args.new_tokens}")
    for note in notes:
        print("NOTE:", note)
    print(json.dumps({"cpu": cpu_name(), "threads": args.threads, "weights": weights, "step_ms": step_ms,
                      "verify_ms": verify_ms, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "tree": spec_opts, "draft": args.draft, "frspec": args.frspec,
                      "loadavg_1min": [load_before, os.getloadavg()[0]], "notes": notes, "results": results}))


if __name__ == "__main__":
    main()
