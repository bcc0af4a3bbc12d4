"""Quantization quality and speed: held-out perplexity per method, decode tok/s and weight memory per format.

Quality (the default model, SmolLM2-135M, fp32 weights quantized by minicpm4.quant.primitives / minicpm4.quant.gptq, run in bf16):
  bf16, int8 (per channel, RTN), int4 (symmetric, group 64: 576 inputs do not split into groups of 128) by RTN,
  GPTQ, GPTQ act-order, GPTQ act-order layer-sequential, P-GPTQ, P-GPTQ act-order (INT4_METHODS), and
  ternary-PTQ (absmean group 32, no QAT: shows why ternary needs QAT). GPTQ / P-GPTQ are calibrated on the first KJV verses
  (Genesis on); perplexity is measured on the last KJV verses (Revelation backwards), text nothing saw.
Speed and memory (2 threads, Engine.stream greedy decode after a prompt of --context tokens, like
  bench_decode.py; median of --repeats). Every one of ours runs the C++ decode stack (model/native_stack.py; the
  JSON's "native" says so per variant, a variant that fell back to the Python layers is flagged in the table):
  bf16 (nn.Linear), int8 (Int8Linear), int4 (Int4Linear: the GGUF's own Q4_1 weights for the default model,
  RTN group 128 for the 0.5B shape), ternary (TernaryLinear); every quantized variant keeps lm_head as int8 rows
  (as `load(gguf, int4=True)` does), bf16 keeps it bf16. llama.cpp runs the same model in the same run twice:
  the shipped Q4_1 GGUF, and a Q8_0 GGUF requantized from it by llama.cpp's own llama_model_quantize (cached
  under ~/.cache/minicpm4/gguf; the default model's float weights are that Q4_1 GGUF dequantized, so both GGUFs
  and our variants hold the same model). The MiniCPM4-0.5B shape (config.minicpm4_0_5b) has random weights:
  speed and memory only, no llama.cpp peer (it would need a GGUF of those random weights).
Per layer: one decode-sized product (1 x K) for each layer kind at the default model's and the 0.5B's shapes.
Memory = bytes of the linear layers' weights (all decoder projections, no embedding / head) and the ratio to bf16;
  the JSON also has every weight tensor's bytes (embedding and head included, tied tensors once).

    python benchmarks/bench_quant.py            # full: ppl on 8 x 512 tokens, 512-token context, 0.5B shape
    python benchmarks/bench_quant.py --quick    # a few minutes idle: ppl on 2 x 256, context 128, no 0.5B
    python benchmarks/bench_quant.py --eval 1 --calib 2 --context 64 --new-tokens 4 --repeats 1  # smoke test
    python benchmarks/bench_quant.py --layers-only   # the per-layer timings alone

Timings on a shared machine are noisy: the 1-minute load average is printed and saved; compare ratios.
The last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import minicpm4
from minicpm4.config import minicpm4_0_5b
from minicpm4.corpus import kjv_text
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.quant.gptq import calibrate, quantize_model_weights, quantize_sequential
from minicpm4.quant.int4 import Int4Linear
from minicpm4.quant.int8 import Int8Linear
from minicpm4.quant.primitives import quantize_int, to_int4_linear, to_int8_linear
from minicpm4.quant.ternary import TernaryLinear

INT4_GROUP = 64  # the default model's 576 inputs are not a multiple of 128
from bench_decode import THREADS  # the same decode timing (benchmarks/ is on sys.path as the script's folder)
from bench_decode import llamacpp_runner, ours_runner


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def swap(model: nn.Module, layers: dict[str, nn.Module], int8_head: bool = True) -> nn.Module:
    """`model` (bf16) with the named nn.Linear replaced, and lm_head as int8 rows."""
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    if int8_head:
        model.lm_head = Int8Linear.from_float(model.lm_head.weight)
    return model.eval()


def all_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of the model but the rotary tables (a tied head counted once)."""
    seen = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "rotary_emb" not in name:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def q8_0_gguf(q4_1: Path) -> Path:
    """A Q8_0 GGUF of the same model, requantized from `q4_1` by llama.cpp's own llama_model_quantize (all
    layer weights to Q8_0; its Q4_1 values are exact in fp32 and 8-bit blocks hold them closely). Cached beside
    the source under the default model cache, written to a temp name and renamed."""
    import ctypes

    import llama_cpp

    from minicpm4.io.default_model import cache_root
    out = cache_root() / "gguf" / q4_1.name.replace("Q4_1", "Q8_0")
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, THREADS
    saved = os.dup(2)  # llama.cpp logs every tensor to stderr
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            rc = llama_cpp.llama_model_quantize(str(q4_1).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {q4_1} -> Q8_0 failed with status {rc}")
    os.replace(tmp, out)
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every decoder-layer projection's weight tensors (nn.Linear parameters or packed buffers)."""
    kinds = (nn.Linear, Int4Linear, Int8Linear, TernaryLinear)
    return sum(t.numel() * t.element_size() for layer in model.model.layers for m in layer.modules()
               if isinstance(m, kinds) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])


# int4 calibration variants: label -> (method, act_order, sequential); see minicpm4/quant/gptq.py
INT4_METHODS = {"int4-RTN": ("rtn", False, False),
                "int4-GPTQ": ("gptq", False, False),
                "int4-GPTQ act-order": ("gptq", True, False),
                "int4-GPTQ act-order seq": ("gptq", True, True),
                "int4-P-GPTQ": ("pgptq", False, False),
                "int4-P-GPTQ act-order": ("pgptq", True, False)}


def quantized_variants(fp32: MiniCPM4ForCausalLM, calib: list[torch.Tensor]) -> dict[str, nn.Module]:
    """bf16 and quantized copies of an fp32 model; GPTQ variants calibrated on the token batches `calib`."""
    out = {"bf16": copy.deepcopy(fp32).to(torch.bfloat16).eval()}
    names = list(linears(fp32))
    qt8 = {n: quantize_int(fp32.get_submodule(n).weight, 8, fp32.get_submodule(n).in_features) for n in names}
    out["int8"] = swap(copy.deepcopy(out["bf16"]), {n: to_int8_linear(q) for n, q in qt8.items()})
    hessians = calibrate(fp32, calib, names, skip_prefix=4)  # one float pass serves every one-pass variant
    for label, (method, act_order, sequential) in INT4_METHODS.items():
        t0 = time.perf_counter()
        if sequential:
            qt = quantize_sequential(fp32, calib, method, 4, INT4_GROUP, act_order=act_order)
        else:
            qt = quantize_model_weights(fp32, hessians, method, 4, INT4_GROUP, act_order=act_order)
        out[label] = swap(copy.deepcopy(out["bf16"]), {n: to_int4_linear(q) for n, q in qt.items()})
        print(f"  quantized {label} in {time.perf_counter() - t0:.0f} s", flush=True)
    out["ternary-PTQ"] = swap(copy.deepcopy(out["bf16"]),
                              {n: TernaryLinear.from_float(fp32.get_submodule(n).weight) for n in names})
    return out


LAYER_SHAPES = {"default": [(1728, 576), (576, 576), (3072, 576), (576, 1536)],  # fused qkv, o, gate_up, down
                "minicpm4-0.5b": [(1280, 1024), (1024, 1024), (8192, 1024), (1024, 4096)]}


@torch.no_grad()
def layer_speed(repeats: int = 200, threads: int = 1) -> dict:
    """Median microseconds of one decode-sized (1-row, bf16) product per layer kind and shape, interleaved.
    One thread by default: on a shared machine a 2-thread product of tens of microseconds is dominated by
    barrier stalls whenever another process takes a core."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    g = torch.Generator().manual_seed(0)
    for model_name, shapes in LAYER_SHAPES.items():
        for n, k in shapes:
            w = torch.randn(n, k, generator=g) * 0.02
            bf16 = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            bf16.weight.data = w.to(torch.bfloat16)
            layers = {"bf16": bf16, "int8": Int8Linear.from_float(w),
                      "int4": to_int4_linear(quantize_int(w, 4, 64)), "ternary": TernaryLinear.from_float(w)}
            x = torch.randn(1, k, generator=g).to(torch.bfloat16)
            times = {name: [] for name in layers}
            for i in range(repeats + 10):
                for name, layer in layers.items():
                    t = time.perf_counter()
                    layer(x)
                    if i >= 10:
                        times[name].append(time.perf_counter() - t)
            med = {name: statistics.median(ts) * 1e6 for name, ts in times.items()}
            out[f"{model_name} {n}x{k}"] = {"us": med, "speedup_vs_bf16": {nm: med["bf16"] / v for nm, v in med.items()}}
    torch.set_num_threads(saved)
    return out


def report_layers(repeats: int, threads: int) -> dict:
    layers = layer_speed(repeats, threads)
    print(f"\none decode-sized product (1 x K bf16), median microseconds (x speed-up over bf16), {threads} thread(s):")
    for shape, r in layers.items():
        print(f"  {shape:<24}" + "  ".join(f"{nm} {v:7.1f} (x{r['speedup_vs_bf16'][nm]:.2f})" for nm, v in r["us"].items()))
    return layers


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    nll = [nn.functional.cross_entropy(model(w[None])[0, :-1].float(), w[1:]).item() for w in windows]
    return math.exp(sum(nll) / len(nll))


def decode_speed(runners: dict, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """Median decode tok/s of each runner, runs interleaved (machine noise hits all alike), after one warm-up."""
    runs = {name: [] for name in runners}
    for i in range(repeats + 1):
        for name, run in runners.items():
            _, decode_s, _ = run(prompt, new_tokens)
            if i:
                runs[name].append(decode_s)
    return {name: 1 / statistics.median(r) for name, r in runs.items()}


def measure(models: dict[str, nn.Module], runners: dict, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Decode speed of every runner; memory and decode path (C++ stack or not) of each of our models. Runs after
    ours_runner has fused the models (which builds their native stack)."""
    return {"decode_tok_s": decode_speed(runners, prompt, new_tokens, repeats),
            "weight_bytes": {n: weight_bytes(m) for n, m in models.items()},
            "all_weight_bytes": {n: all_weight_bytes(m) for n, m in models.items()},
            "native": {n: m.native is not None for n, m in models.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, default model only")
    ap.add_argument("--context", type=int, default=None, help="prompt tokens before decode (default 512, quick 128)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--eval", type=int, default=None, help="held-out perplexity windows (default 8, quick 2)")
    ap.add_argument("--calib", type=int, default=None, help="calibration sequences (default 32, quick 8)")
    ap.add_argument("--skip-05b", action="store_true", help="no MiniCPM4-0.5B-shape speed run")
    ap.add_argument("--no-ppl", action="store_true", help="speed and memory only (no calibration / perplexity)")
    ap.add_argument("--layer-threads", type=int, default=1, help="threads for the per-layer timings")
    ap.add_argument("--layers-only", action="store_true", help="only the per-layer timings (a minute)")
    args = ap.parse_args()
    q = args.quick
    context = args.context or (128 if q else 512)
    new_tokens = args.new_tokens or (16 if q else 32)
    repeats = args.repeats or (1 if q else 3)
    n_eval, eval_len, n_calib, calib_len = (2, 256, 8, 256) if q else (8, 512, 32, 512)
    n_eval, n_calib = args.eval or n_eval, args.calib or n_calib
    torch.set_num_threads(THREADS)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()

    if args.layers_only:
        layers = report_layers(200, args.layer_threads)
        print(json.dumps({"layer_us": layers, "layer_threads": args.layer_threads,
                          "loadavg_1min": [load0, os.getloadavg()[0]], "torch": torch.__version__}))
        return
    fp32, tok = minicpm4.load("default", dtype="fp32")
    verses = kjv_text().split("\n")
    calib_ids = tok.encode("\n".join(verses[:3000]))
    eval_ids = tok.encode("\n".join(verses[-3000:]))
    bos = tok.bos_token_id
    seqs = [[bos] + calib_ids[i * calib_len:(i + 1) * calib_len - 1] for i in range(n_calib)]
    calib = [torch.tensor(seqs[i:i + 4]) for i in range(0, n_calib, 4)]  # batches of up to 4 sequences
    windows = torch.tensor([[bos] + eval_ids[i * eval_len:(i + 1) * eval_len - 1] for i in range(n_eval)])
    print(f"calibrating GPTQ on {n_calib} x {calib_len} KJV tokens (Genesis on); perplexity on {n_eval} x {eval_len} "
          f"held-out KJV tokens (the last verses); load average {load0:.1f}", flush=True)
    ppl = {}
    if not args.no_ppl:
        variants = quantized_variants(fp32, calib)
        ppl = {name: perplexity(m, windows) for name, m in variants.items()}
        for name, p in ppl.items():
            print(f"  {name:<26} perplexity {p:8.3f}   x{p / ppl['bf16']:.3f} of bf16", flush=True)
        del variants

    layers = report_layers(50 if q else 200, args.layer_threads)
    # speed and memory: the default model (its GGUF Q4_1 for int4, as llama.cpp runs it) ...
    from minicpm4.io.default_model import default_gguf_path
    gguf = default_gguf_path()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16).eval()
    names = list(linears(fp32))
    speed_models = {"bf16": bf16,
                    "int8": swap(copy.deepcopy(bf16), {n: Int8Linear.from_float(fp32.get_submodule(n).weight)
                                                       for n in names}),
                    "int4": minicpm4.load(gguf, dtype="bf16", int4=True)[0],
                    "ternary": swap(copy.deepcopy(bf16), {n: TernaryLinear.from_float(fp32.get_submodule(n).weight)
                                                          for n in names})}
    prompt = (tok.encode(" ".join(verses[:400])) * 2)[:context]
    runners = {name: ours_runner(m) for name, m in speed_models.items()}  # fuses, builds the native stack
    runners["llama.cpp Q4_1"] = llamacpp_runner(gguf, context + new_tokens + 8)
    runners["llama.cpp Q8_0"] = llamacpp_runner(q8_0_gguf(gguf), context + new_tokens + 8)
    results = {"default": measure(speed_models, runners, prompt, new_tokens, repeats)}
    del speed_models, runners
    # ... and the MiniCPM4-0.5B shape with random weights
    if not (q or args.skip_05b):
        torch.manual_seed(0)
        big = MiniCPM4ForCausalLM(minicpm4_0_5b()).eval()
        names = list(linears(big))
        bf16 = copy.deepcopy(big).to(torch.bfloat16).eval()
        models = {"bf16": bf16,
                  "int8": swap(copy.deepcopy(bf16), {n: Int8Linear.from_float(big.get_submodule(n).weight) for n in names}),
                  "int4": swap(copy.deepcopy(bf16), {n: to_int4_linear(quantize_int(big.get_submodule(n).weight, 4, 128))
                                                      for n in names}),
                  "ternary": swap(copy.deepcopy(bf16), {n: TernaryLinear.from_float(big.get_submodule(n).weight)
                                                         for n in names})}
        del big
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, 73000, (context,), generator=g).tolist()
        results["minicpm4-0.5b"] = measure(models, {n: ours_runner(m) for n, m in models.items()}, prompt,
                                           new_tokens, repeats)
    print(f"\ndecode after a {context}-token prompt, {new_tokens} new tokens, {THREADS} threads, median of {repeats}:")
    for shape, r in results.items():
        sp, mem = r["decode_tok_s"], r["weight_bytes"]
        r["decode_vs_bf16"] = {n: v / sp["bf16"] for n, v in sp.items()}
        r["memory_vs_bf16"] = {n: v / mem["bf16"] for n, v in mem.items()}
        for peer in ("Q4_1", "Q8_0"):
            if f"llama.cpp {peer}" in sp:
                r[f"decode_vs_llamacpp_{peer.lower()}"] = {n: v / sp[f"llama.cpp {peer}"] for n, v in sp.items()}
        for n, v in sp.items():
            line = f"  {shape:<14} {n:<15} {v:8.1f} tok/s  x{r['decode_vs_bf16'][n]:.2f} of bf16"
            for peer in ("q4_1", "q8_0"):
                if f"decode_vs_llamacpp_{peer}" in r:
                    line += f"  x{r[f'decode_vs_llamacpp_{peer}'][n]:.2f} of llama.cpp {peer.upper()}"
            if n in mem:
                line += (f"   layer weights {mem[n] / 2**20:7.1f} MiB (x{r['memory_vs_bf16'][n]:.3f} of bf16), "
                         f"all {r['all_weight_bytes'][n] / 2**20:6.1f} MiB")
                line += "" if r["native"][n] else "   (NOT on the C++ decode stack: Python layers)"
            print(line)
    load1 = os.getloadavg()[0]
    print(f"load average {load0:.1f} at start, {load1:.1f} at end; {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"quick": q, "context": context, "new_tokens": new_tokens, "repeats": repeats,
                      "threads": THREADS, "ppl_windows": [n_eval, eval_len], "calib": [n_calib, calib_len],
                      "perplexity": ppl, "layer_us": layers, "speed": results, "loadavg_1min": [load0, load1],
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
