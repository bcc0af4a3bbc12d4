"""InfLLM v2 in the whole model: decode step and prefill, sparse vs dense, and decode against llama.cpp.

  decode   MiniCPM4-0.5B shape (24 layers, hidden 1024, 16/2 heads, head_dim 64), random weights, bf16, batch 1.
           A KV cache of S tokens is filled with random keys and values (a decode step's cost does not depend on
           them: dense reads every key, sparse always K = topk + window/block blocks), then steps at positions
           S, S+1, ... alternate between the dense backend (SDPA) and the sparse one (default sparse_config, so
           sparse from 8192 keys on) on the same model, each in its C++ decode stack (model/native_stack.py;
           `sparse_py`: the sparse backend through the Python layers, also timed); the sparse ones share a cache with
           compressed keys, the dense one a cache without (the dense stack takes no other). The first sparse step pools
           every compressed key (untimed); later ones pool at most one new kernel each, as in generation. Median per
           step. --kv-int8: dense and sparse also on int8 caches (quant/kv8.py), and the caches' bytes.
  memory   in a child process (glibc maps every allocation >= 64 KiB on its own, so RSS follows live tensors):
           peak RSS during one step above the RSS before it, i.e. the step's working memory; the cache itself
           (KV and, for sparse, the compressed keys: 1/16 + 1/64 of the key cache) is reported on its own.
  prefill  the same shape with --prefill-layers layers (whole-model prefill at 32K is minutes per layer here),
           one cache-less forward of S random tokens, dense vs sparse.
  llama    the default model (SmolLM2-135M) at --llama-context tokens: ours (bf16, fused, dense and sparse, cache
           filled with random keys as above) against llama-cpp-python on the GGUF (Q4_1, flash attention,
           --threads threads) after a real prefill of that many KJV tokens (slow: quadratic prefill on 2 cores).
Times are medians of wall time and of this thread's CPU time; with --threads 1 the latter excludes the time other
jobs hold the core (ours and llama.cpp both compute in the calling thread then), the better number on a busy machine.

    python benchmarks/bench_sparse_model.py --decode 8192,32768,65536 --prefill 8192 --llama-context 8192
The last stdout line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from bench_sparse import peak_rss, reset_peak_rss

from minicpm4.config import SPARSE_DEFAULTS, minicpm4_0_5b
from minicpm4.model.decoder import MiniCPM4ForCausalLM, dense_attention
from minicpm4.model.kv_cache import KVCache
from minicpm4.model.native_stack import attach
from minicpm4.quant import kv8
from minicpm4.sparse.attention import make_backend


def random_model(layers: int) -> MiniCPM4ForCausalLM:
    cfg = dataclasses.replace(minicpm4_0_5b(), num_hidden_layers=layers, max_position_embeddings=131072,
                              sparse_config=dict(SPARSE_DEFAULTS))
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return attach(model)


def filled_cache(model: MiniCPM4ForCausalLM, s: int, extra: int, kv_dtype: str = "auto",
                 compressed: bool = True) -> KVCache:
    """A cache of s + extra slots whose first s hold random keys and values (kv_dtype "int8": those quantized);
    compressed: with InfLLM v2's compressed keys (the sparse stack's cache; the dense stack takes a cache without)."""
    cfg = model.config if compressed else dataclasses.replace(model.config, sparse_config=None)
    cache = KVCache(cfg, 1, s + extra, torch.bfloat16, kv_dtype=kv_dtype)
    g = torch.Generator().manual_seed(1)
    for x, sc in ((cache.k, cache.k_scale), (cache.v, cache.v_scale)):
        r = torch.randn(x[:, :, :, :s].shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
        if sc is None:
            x[:, :, :, :s] = r
        else:
            x[:, :, :, :s], sc[:, :, :, :s] = kv8.quantize(r)
    return cache


def backends(model: MiniCPM4ForCausalLM, int8: bool = False) -> dict:
    """dense and sparse each run in the C++ decode stack built for them (model/native_stack.py); sparse_py is the
    sparse backend through the Python layers (the stack off), the reference path. int8: also dense_kv8 and
    sparse_kv8, the same stacks on an int8 KV cache (quant/kv8.py)."""
    sparse = make_backend(model.config.sparse_config)
    out = {"dense": dense_attention, "sparse": sparse, "sparse_py": sparse}
    return out | ({"dense_kv8": dense_attention, "sparse_kv8": sparse} if int8 else {})


def use(model: MiniCPM4ForCausalLM, name: str, backend, stacks: dict) -> None:
    """Switch model to `backend`, with the C++ stack fuse_projections() builds for it (kept in `stacks`)."""
    model.set_attention_backend(backend)
    kind = name.removesuffix("_kv8")
    if kind not in stacks:
        stacks[kind] = None if kind.endswith("_py") else attach(model).native
    model.native = stacks[kind]


def step(model, cache, pos: int) -> None:
    ids = torch.tensor([[1000 + pos % 5000]])
    model(ids, positions=torch.tensor([[pos]]), cache=cache, logits_to_keep=1)


def clock() -> tuple[float, float]:
    """(wall, this thread's CPU) seconds. With 1 thread, ops (ours and llama.cpp's) run inline in this thread, so
    CPU time excludes the time other jobs hold the core: on a machine with more runnable jobs than cores a step
    is preempted most times and its wall time says little."""
    return time.perf_counter(), time.thread_time()


@torch.inference_mode()
def decode_times(model, s: int, steps: int, int8: bool = False) -> dict:
    """Median wall and thread-CPU seconds per step of each backend, interleaved on one cache (the _kv8 ones on
    an int8 cache)."""
    # the dense stack runs on a cache without compressed keys (model/native_stack.NativeDecoder.usable), the sparse
    # ones on a cache with them
    kinds = ("auto", "int8") if int8 else ("auto",)
    caches = {(d, c): filled_cache(model, s, steps + 2, d, compressed=c) for d in kinds for c in (False, True)}
    times = {name: ([], []) for name in backends(model, int8)}
    stacks = {}
    for i in range(-1, steps):  # i = -1: untimed warm-up (the sparse one pools every kernel)
        for name, backend in backends(model, int8).items():
            use(model, name, backend, stacks)
            cache = caches["int8" if name.endswith("_kv8") else "auto", not name.startswith("dense")]
            w0, c0 = clock()
            step(model, cache, s + i + 1)
            w1, c1 = clock()
            if i >= 0:
                times[name][0].append(w1 - w0)
                times[name][1].append(c1 - c0)
    return {**{name: statistics.median(w) for name, (w, _) in times.items()},
            **{f"{name}_cpu": statistics.median(c) for name, (_, c) in times.items()}}


@torch.inference_mode()
def decode_memory(model, s: int) -> dict:
    cache = filled_cache(model, s, 4)
    out = {"kv_cache_mib": round((cache.k.numel() + cache.v.numel()) * 2 / 2**20, 1),
           "compressed_cache_mib": round(sum(c.numel() for c in cache.compressed.c) * 2 / 2**20, 1)}
    stacks = {}
    for name, backend in backends(model).items():
        use(model, name, backend, stacks)
        # the first step: sparse pools every compressed key and allocates its reused scratch buffers here
        rss0 = reset_peak_rss()
        step(model, cache, s)
        out[f"{name}_first_step_mib"] = round((peak_rss() - rss0) / 1024, 1)
        rss0 = reset_peak_rss()
        step(model, cache, s + 1)
        out[f"{name}_step_mib"] = round((peak_rss() - rss0) / 1024, 1)
    return out


@torch.inference_mode()
def prefill_times(model, s: int) -> dict:
    ids = torch.randint(100, 70000, (1, s), generator=torch.Generator().manual_seed(2))
    out = {}
    for name, backend in backends(model).items():
        if name.endswith("_py"):
            continue  # prefill never runs the decode stack
        model.set_attention_backend(backend)
        w0, c0 = clock()
        model(ids, logits_to_keep=1)
        w1, c1 = clock()
        out[name], out[f"{name}_cpu"] = w1 - w0, c1 - c0
    return out


def kjv_ids(tokenizer, n: int) -> list[int]:
    from bench_decode import prompt_text
    text, _ = prompt_text()
    ids = tokenizer.encode(text)
    return (ids * (n // len(ids) + 1))[:n]


@torch.inference_mode()
def llama_comparison(s: int, steps: int, threads: int, batch_threads: int) -> dict:
    import llama_cpp

    import minicpm4
    from minicpm4.io.default_model import default_gguf_path
    model, tok = minicpm4.load("default", dtype="bf16")
    attach(model)
    cfg = dataclasses.replace(model.config, sparse_config=dict(SPARSE_DEFAULTS))
    model.config = cfg
    ours = decode_times(model, s, steps)
    llm = llama_cpp.Llama(model_path=str(default_gguf_path()), n_ctx=s + steps + 8, n_batch=2048, n_ubatch=512,
                          n_threads=threads, n_threads_batch=batch_threads, flash_attn=True, verbose=False)
    t0 = time.perf_counter()
    llm.eval(kjv_ids(tok, s))
    prefill_s = time.perf_counter() - t0
    wall, cpu = [], []
    for i in range(steps + 1):
        w0, c0 = clock()
        llm.eval([1000 + i])
        w1, c1 = clock()
        if i:
            wall.append(w1 - w0)
            cpu.append(c1 - c0)
    out = {"context": s, "llamacpp_prefill_s": prefill_s}
    for key, (mine, cpp) in {"": ({k: v for k, v in ours.items() if not k.endswith("_cpu")}, statistics.median(wall)),
                             "_cpu": ({k[:-4]: v for k, v in ours.items() if k.endswith("_cpu")},
                                      statistics.median(cpu))}.items():
        out |= {f"ours_dense_ms{key}": 1e3 * mine["dense"], f"ours_sparse_ms{key}": 1e3 * mine["sparse"],
                f"llamacpp_ms{key}": 1e3 * cpp, f"sparse_over_llamacpp_tok_s{key}": cpp / mine["sparse"],
                f"dense_over_llamacpp_tok_s{key}": cpp / mine["dense"]}
    return out


def kv8_row(model, s: int, t: dict) -> dict:
    """The int8 cache's numbers of a decode row: step times, speedups over the bf16 cache (> 1: int8 faster), and
    the KV bytes of both caches of s slots (keys, values and the int8 scales; C1/C2 are the same for both)."""
    nbytes = {d: KVCache(model.config, 1, s, torch.bfloat16, device="meta", kv_dtype=d).nbytes() for d in kv8.KV_DTYPES}
    out = {"kv_bytes": nbytes["auto"], "kv8_bytes": nbytes["int8"], "kv8_bytes_ratio": nbytes["int8"] / nbytes["auto"]}
    for kind in ("dense", "sparse"):
        for key in ("", "_cpu"):
            out[f"{kind}_kv8{key}_ms"] = 1e3 * t[f"{kind}_kv8{key}"]
            out[f"{kind}_kv8_speedup{key}"] = t[f"{kind}{key}"] / t[f"{kind}_kv8{key}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decode", default="8192,16384,32768,65536", help="decode cache lengths ('' = none)")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per backend and length")
    ap.add_argument("--layers", type=int, default=24, help="layers of the decode model")
    ap.add_argument("--prefill", default="8192,16384", help="prefill lengths ('' = none)")
    ap.add_argument("--prefill-layers", type=int, default=2)
    ap.add_argument("--llama-context", type=int, default=32768, help="0 = skip the llama.cpp comparison")
    ap.add_argument("--llama-prefill-threads", type=int, default=0,
                    help="llama.cpp's threads for the untimed prefill (default: --threads); decode uses --threads")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-int8", action="store_true",
                    help="also time dense and sparse decode on an int8 KV cache (quant/kv8.py), and report its bytes")
    ap.add_argument("--memory-worker", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.memory_worker:
        print(json.dumps(decode_memory(random_model(a.layers), a.memory_worker)))
        return
    result = {"bench": "sparse_model", "threads": a.threads, "layers": a.layers, "prefill_layers": a.prefill_layers,
              "sparse_config": SPARSE_DEFAULTS, "torch": torch.__version__, "decode": [], "prefill": []}
    lengths = {m: [int(x) for x in getattr(a, m).split(",") if x] for m in ("decode", "prefill")}
    if lengths["decode"]:
        model = random_model(a.layers)
        for s in lengths["decode"]:
            t = decode_times(model, s, a.steps, a.kv_int8)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            proc = subprocess.run([sys.executable, __file__, "--memory-worker", str(s), "--layers", str(a.layers),
                                   "--threads", str(a.threads)], capture_output=True, text=True, check=True, env=env)
            row = {"s": s, "dense_ms": 1e3 * t["dense"], "sparse_ms": 1e3 * t["sparse"],
                   "sparse_py_ms": 1e3 * t["sparse_py"], "sparse_py_cpu_ms": 1e3 * t["sparse_py_cpu"],
                   "speedup": t["dense"] / t["sparse"], "dense_cpu_ms": 1e3 * t["dense_cpu"],
                   "sparse_cpu_ms": 1e3 * t["sparse_cpu"], "speedup_cpu": t["dense_cpu"] / t["sparse_cpu"], **json.loads(proc.stdout.strip().splitlines()[-1]),
                   "load_avg": os.getloadavg()[0]}
            if a.kv_int8:
                row |= kv8_row(model, s, t)
            result["decode"].append(row)
            print(f"decode {s:>6}: dense {row['dense_ms']:8.1f} ms  sparse {row['sparse_ms']:8.1f} ms  "
                  f"x{row['speedup']:.2f} (thread CPU {row['dense_cpu_ms']:.1f} / {row['sparse_cpu_ms']:.1f} ms "
                  f"x{row['speedup_cpu']:.2f}; sparse through the Python layers {row['sparse_py_cpu_ms']:.1f} ms)  "
                  f"MiB first/next step: dense {row['dense_first_step_mib']}/{row['dense_step_mib']} "
                  f"sparse {row['sparse_first_step_mib']}/{row['sparse_step_mib']}  "
                  f"(KV {row['kv_cache_mib']} MiB + compressed {row['compressed_cache_mib']} MiB)", flush=True)
            if a.kv_int8:
                print(f"  int8 KV cache: dense {row['dense_kv8_cpu_ms']:.1f} ms (x{row['dense_kv8_speedup_cpu']:.2f} "
                      f"of bf16), sparse {row['sparse_kv8_cpu_ms']:.1f} ms (x{row['sparse_kv8_speedup_cpu']:.2f}) "
                      f"thread CPU; wall x{row['dense_kv8_speedup']:.2f} / x{row['sparse_kv8_speedup']:.2f}; "
                      f"KV bytes {row['kv8_bytes']} vs {row['kv_bytes']} (x{row['kv8_bytes_ratio']:.3f})", flush=True)
        del model
    if lengths["prefill"]:
        model = random_model(a.prefill_layers)
        for s in lengths["prefill"]:
            t = prefill_times(model, s)
            row = {"s": s, "dense_s": t["dense"], "sparse_s": t["sparse"], "speedup": t["dense"] / t["sparse"],
                   "dense_cpu_s": t["dense_cpu"], "sparse_cpu_s": t["sparse_cpu"],
                   "speedup_cpu": t["dense_cpu"] / t["sparse_cpu"], "load_avg": os.getloadavg()[0]}
            result["prefill"].append(row)
            print(f"prefill {s:>6} ({a.prefill_layers} layers): dense {t['dense']:.1f} s  sparse {t['sparse']:.1f} s  "
                  f"x{row['speedup']:.2f} (thread CPU {t['dense_cpu']:.1f} / {t['sparse_cpu']:.1f} s "
                  f"x{row['speedup_cpu']:.2f})", flush=True)
        del model
    if a.llama_context:
        r = result["llama"] = llama_comparison(a.llama_context, a.steps, a.threads, a.llama_prefill_threads or a.threads)
        for key, what in (("", "wall"), ("_cpu", "thread CPU")):
            print(f"default model at {r['context']} ({what}): ours dense {r['ours_dense_ms' + key]:.1f} ms, sparse "
                  f"{r['ours_sparse_ms' + key]:.1f} ms, llama.cpp {r['llamacpp_ms' + key]:.1f} ms/token -> sparse "
                  f"x{r['sparse_over_llamacpp_tok_s' + key]:.2f} llama.cpp's tokens/s", flush=True)
    result["load_avg"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
