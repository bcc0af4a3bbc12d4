"""InfLLM v2 sparse attention (minicpm4/sparse/attention.py) against dense SDPA, attention alone, on CPU.

Shape: MiniCPM4-0.5B attention (16 query heads, 2 KV heads, head_dim 64), batch 1, bf16; sparse settings are
SPARSE_DEFAULTS (kernel 32/16, block 64, window 2048, topk 64, so 96 blocks = 6144 keys per query) with
dense_len = -1 (always sparse).

  prefill  q_len = S. dense: SDPA is_causal with enable_gqa. sparse: infllmv2_attention, compressed keys,
           selection and attention included (the C++ chunk kernel: every query over its own blocks; with
           MINICPM4_NATIVE=0 in the environment, the PyTorch reference instead).
  decode   one query at position S-1 over a cache of S keys (a slice of a larger buffer, as KVCache returns).
           dense: SDPA with the G query heads of a KV head folded into query rows (faster than enable_gqa,
           which copies k and v G times), as the model's dense decode runs it. sparse: infllmv2_attention
           given cached compressed keys (compressed=(C1, C2)), as the model's KVCache.compressed provides them:
           the C++ step (csrc/sparse_attention.h). `torch` is the same call with MINICPM4_NATIVE=0, the
           pure-PyTorch reference (sparse_decode.select_one + attend_one), timed in the same rounds.

Data: random q, k, v (iid normal), the worst case for the PyTorch reference's prefill: its stage 2 attends a chunk
of 64 queries to the union of their selected blocks, and iid queries select unrelated blocks, so the union
approaches every past block (the C++ kernel's multiply-adds do not depend on the union; its block reads, once per
64 queries, do). `clustered` queries (a shared direction per 64-token block plus noise) select more alike. Where real
model queries fall between the two is not measured here. The union/K column is the mean union size over the
selection size K, per chunk and KV head (below 1 where a query has fewer than K blocks to pick from).
Decode cost does not depend on the data.

Each case runs in two subprocesses, both after a warm-up call. One times it: the median of --repeats runs
(decode: dense and sparse steps alternate in that one process, so a busy machine slows both alike). The
other measures peak MiB: the peak RSS during one call above the RSS just before it (peak reset through
/proc/self/clear_refs), i.e. the call's working memory beyond its inputs, output included; glibc is told to map
every allocation of 64 KiB or more on its own, so freed memory leaves RSS and cannot hide a later peak. Dense
cases are measured once per length (their cost does not depend on the data). The last stdout line is one JSON
object with every number.

    python benchmarks/bench_sparse.py                      # prefill 8K,16K,32K; decode 8K..64K; 2 threads
    python benchmarks/bench_sparse.py --threads 1          # on a shared machine: a busy second core stalls
                                                           # every 2-thread op (10x slower sparse decode)
    python benchmarks/bench_sparse.py --prefill 8192 --decode 65536 --data random --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from minicpm4.config import SPARSE_DEFAULTS
from minicpm4.sparse.attention import ATTN_CHUNK, SparseConfig, infllmv2_attention, select_blocks
from minicpm4.sparse.select import compress_both, pad_kernels

HEADS, KV_HEADS, HEAD_DIM = 16, 2, 64


def make_inputs(s: int, q_len: int, data: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(1, KV_HEADS, s + 256, HEAD_DIM, generator=g)[:, :, :s] for _ in range(2))  # cache slices
    q = torch.randn(1, HEADS, s, HEAD_DIM, generator=g)
    if data == "clustered":  # queries of one 64-token block share a direction
        base = torch.randn(1, HEADS, -(-s // 64), HEAD_DIM, generator=g).repeat_interleave(64, dim=2)[:, :, :s]
        q = 2.0 * base + 0.5 * q
    return tuple(x.to(torch.bfloat16) for x in (q[:, :, s - q_len:].contiguous(), k, v))


def union_ratio(q: torch.Tensor, k: torch.Tensor, cfg: SparseConfig) -> float:
    """Mean over stage-2 query chunks and KV heads of |union of selected blocks| / K."""
    idx = select_blocks(q, k, None, cfg)  # [1, KVH, T, K]
    ratios = []
    for i in range(0, idx.shape[2], ATTN_CHUNK):
        part = idx[0, :, i:i + ATTN_CHUNK]
        for head in part:
            ratios.append(len(set(head[head >= 0].tolist())) / idx.shape[-1])
    return statistics.mean(ratios)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux clear_refs 5) and return it in KiB; without /proc,
    fall back to getrusage's max RSS, which then also counts any earlier, higher peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss() -> int:
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def make_call(mode: str, impl: str, s: int, data: str):
    """The timed call of one case, inputs prepared (decode: with the compressed keys a cache would hold)."""
    cfg = SparseConfig.from_dict({**SPARSE_DEFAULTS, "dense_len": -1})
    q, k, v = make_inputs(s, s if mode == "prefill" else 1, data)
    if impl == "dense" and mode == "prefill":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if impl == "dense":
        qf = q.reshape(KV_HEADS, 1, HEADS // KV_HEADS, HEAD_DIM)  # G heads of a KV head as G query rows
        kf, vf = k.reshape(KV_HEADS, 1, s, HEAD_DIM), v.reshape(KV_HEADS, 1, s, HEAD_DIM)
        return lambda: F.scaled_dot_product_attention(qf, kf, vf)
    # decode: the compressed keys as KVCache.compressed holds them (zero-padded to whole KERNEL_BUCKETs)
    compressed = tuple(pad_kernels(c) for c in compress_both(k, cfg)) if mode == "decode" else None
    return lambda: infllmv2_attention(q, k, v, config=cfg, compressed=compressed)


def paired_decode(s: int, data: str, repeats: int) -> dict:
    """Decode steps of dense and sparse alternately in one process; medians of wall time, and of this thread's CPU
    time, which with 1 thread (ops run inline) excludes the time other jobs hold the core: on a shared machine
    with more runnable jobs than cores, a 3 ms call is preempted most times and its wall time says little."""
    with torch.inference_mode():
        calls = {impl: make_call("decode", "sparse" if impl == "torch" else impl, s, data)
                 for impl in ("dense", "sparse", "torch")}
        wall = {impl: [] for impl in calls}
        cpu = {impl: [] for impl in calls}
        for i in range(repeats + 1):  # the first round is a warm-up
            for impl, call in calls.items():
                os.environ["MINICPM4_NATIVE"] = "0" if impl == "torch" else "1"  # read at every call
                t0, c0 = time.perf_counter(), time.thread_time()
                call()
                if i:
                    wall[impl].append(time.perf_counter() - t0)
                    cpu[impl].append(time.thread_time() - c0)
    return {**{impl: 1e3 * statistics.median(t) for impl, t in wall.items()},
            **{f"{impl}_cpu": 1e3 * statistics.median(t) for impl, t in cpu.items()}}


def worker(mode: str, impl: str, s: int, data: str, repeats: int, measure: str) -> dict:
    if measure == "time" and mode == "decode":
        return paired_decode(s, data, repeats)
    with torch.inference_mode():
        # warm-up (a prefill one at 8K, where selection already scores blocks): it also faults in the library
        # code the call runs, which would otherwise count as memory
        make_call(mode, impl, min(s, 8192) if mode == "prefill" else s, data)()
        call = make_call(mode, impl, s, data)
        if measure == "memory":
            rss0 = reset_peak_rss()
            call()
            return {"peak_mib": round((peak_rss() - rss0) / 1024, 1)}
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            call()
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    out = {"ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu)}
    if impl == "sparse" and mode == "prefill":
        cfg = SparseConfig.from_dict({**SPARSE_DEFAULTS, "dense_len": -1})
        q, k, _ = make_inputs(s, s, data)
        out["union_over_k"] = round(union_ratio(q, k, cfg), 2)
    return out


def run_case(mode: str, impl: str, s: int, data: str, repeats: int, threads: int,
             measures: tuple[str, ...] = ("time", "memory")) -> dict:
    """Time in one subprocess, memory in another: the malloc setting that makes RSS honest also slows small calls."""
    result = {}
    for measure in measures:
        args = [sys.executable, __file__, "--worker", mode, impl, str(s), data, str(repeats), measure,
                "--threads", str(threads)]
        # every allocation >= 64 KiB gets its own mapping, returned on free: RSS then follows live tensors
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if measure == "memory" else None
        proc = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefill", default="8192,16384,32768", help="prefill lengths, comma separated ('' = none)")
    ap.add_argument("--decode", default="8192,16384,32768,65536", help="decode cache lengths ('' = none)")
    ap.add_argument("--data", default="random,clustered", help="prefill data: random, clustered or both")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per prefill case (decode: 5x this)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)  # mode impl s data repeats time|memory
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        mode, impl, s, data, repeats, measure = a.worker
        print(json.dumps(worker(mode, impl, int(s), data, int(repeats), measure)))
        return
    lengths = {m: [int(x) for x in getattr(a, m).split(",") if x] for m in ("prefill", "decode")}
    cases = [("prefill", s, d) for s in lengths["prefill"] for d in a.data.split(",")]
    cases += [("decode", s, "random") for s in lengths["decode"]]
    rows, dense = [], {}
    for mode, s, data in cases:
        repeats = a.repeats if mode == "prefill" else 5 * a.repeats
        row = {"mode": mode, "s": s, "data": data}
        if mode == "decode":  # timed as pairs in one process, memory one implementation per process
            paired = run_case(mode, "both", s, data, repeats, a.threads, ("time",))
            row["dense"], row["sparse"] = ({"ms": paired[impl], "cpu_ms": paired[f"{impl}_cpu"],
                                            **run_case(mode, impl, s, data, repeats, a.threads, ("memory",))}
                                           for impl in ("dense", "sparse"))
            row["speedup_cpu"] = round(paired["dense_cpu"] / paired["sparse_cpu"], 2)
            row["torch"] = {"ms": paired["torch"], "cpu_ms": paired["torch_cpu"]}
        elif (mode, s) not in dense:  # dense attention costs the same whatever the data: measured once
            dense[mode, s] = run_case(mode, "dense", s, data, repeats, a.threads)
        if mode == "prefill":
            row["dense"] = dense[mode, s]
            row["sparse"] = run_case(mode, "sparse", s, data, repeats, a.threads)
            row["speedup_cpu"] = round(row["dense"]["cpu_ms"] / row["sparse"]["cpu_ms"], 2)
        row["speedup"] = round(row["dense"]["ms"] / row["sparse"]["ms"], 2)
        rows.append(row)
        print(f"  {mode} {s} {data}: dense {row['dense']['ms']:.1f} ms, sparse {row['sparse']['ms']:.1f} ms",
              file=sys.stderr, flush=True)
    print(f"\nInfLLM v2 attention alone, {HEADS} q heads / {KV_HEADS} kv heads / head_dim {HEAD_DIM}, bf16, batch 1, "
          f"{a.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'mode':<8}{'S':>7}  {'data':<10}{'dense ms':>11}{'sparse ms':>11}{'speed-up':>9}"
          f"{'dense MiB':>11}{'sparse MiB':>11}{'union/K':>9}")
    for r in rows:
        union = r["sparse"].get("union_over_k")
        print(f"{r['mode']:<8}{r['s']:>7}  {r['data']:<10}{r['dense']['ms']:>11.2f}{r['sparse']['ms']:>11.2f}"
              f"{r['speedup']:>8.2f}x{r['dense']['peak_mib']:>11.1f}{r['sparse']['peak_mib']:>11.1f}"
              f"{'' if union is None else f'{union:.2f}':>9}"
              + (f"   thread CPU: {r['dense']['cpu_ms']:.2f} / {r['sparse']['cpu_ms']:.2f} ms = {r['speedup_cpu']:.2f}x"
                 + (f" (pure-PyTorch sparse {r['torch']['cpu_ms']:.2f} ms)" if "torch" in r else "")
                 if "speedup_cpu" in r else ""))
    print(json.dumps({"bench": "sparse_attention", "shape": {"heads": HEADS, "kv_heads": KV_HEADS,
                      "head_dim": HEAD_DIM, "dtype": "bfloat16", "batch": 1}, "sparse_config": SPARSE_DEFAULTS
                      | {"dense_len": -1}, "threads": a.threads, "repeats": a.repeats, "load_avg": os.getloadavg(),
                      "torch": torch.__version__, "results": rows}))


if __name__ == "__main__":
    main()
