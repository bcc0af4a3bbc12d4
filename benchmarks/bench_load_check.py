"""Cost of the load-time finiteness check (minicpm4/weights.py: check_finite) on the default model.

Each way of loading runs --repeats times with the check and with MINICPM4_SKIP_FINITE_CHECK=1, interleaved so
machine noise hits both alike; the medians and the relative cost are printed, and the last stdout line is one JSON
object (with the load average before and after). On a shared machine the load times vary by more than the check
costs, so the check is also timed alone (`check_finite` over the loaded state, in memory, median of --repeats).
  minicpm4.load(default)            dtype auto (bf16): every tensor is converted, so read in full, anyway
  minicpm4.load(default, fp32)      no conversion: tensors stay memory-mapped, and the check is what first reads
                                    them (the first forward pass would otherwise)
  LLM.load(default)                 what `minicpm4 generate` and `minicpm4 serve` run (bf16, fused, C++ stack)

    python benchmarks/bench_load_check.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import minicpm4
from minicpm4.io.loader import default_model_dir
from minicpm4.serve.llm import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = str(default_model_dir())
    ways = {"minicpm4.load(default)": lambda: minicpm4.load(src),
            "minicpm4.load(default, fp32)": lambda: minicpm4.load(src, dtype="fp32"),
            "LLM.load(default)": lambda: LLM.load(src)}
    load_before, results = os.getloadavg()[0], {}
    for label, load in ways.items():
        times: dict[str, list[float]] = {"check": [], "skip": []}
        for _ in range(args.repeats):
            for mode in ("skip", "check"):
                os.environ["MINICPM4_SKIP_FINITE_CHECK"] = "1" if mode == "skip" else "0"
                t0 = time.perf_counter()
                loaded = load()
                times[mode].append(time.perf_counter() - t0)
                del loaded
        check, skip = statistics.median(times["check"]), statistics.median(times["skip"])
        results[label] = {"check_s": round(check, 3), "skip_s": round(skip, 3), "cost_pct": round(100 * (check / skip - 1), 1)}
        print(f"{label}: {check:.3f} s with the check, {skip:.3f} s without: {100 * (check / skip - 1):+.1f}%", flush=True)
    os.environ.pop("MINICPM4_SKIP_FINITE_CHECK")
    from minicpm4.weights import check_finite, checkpoint_files, read_state_dict
    for dtype in (torch.bfloat16, torch.float32):
        state = {k: v.clone() for k, v in read_state_dict(checkpoint_files(default_model_dir()), dtype).items()}
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            check_finite(state, "default")
            times.append(time.perf_counter() - t0)
        alone = statistics.median(times)
        results[f"check_finite alone, {dtype}"] = {"check_s": round(alone, 3)}
        print(f"check_finite alone over the {dtype} state: {alone:.3f} s", flush=True)
    print(json.dumps({"repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
                      "loadavg_1min": [load_before, os.getloadavg()[0]], "results": results}))


if __name__ == "__main__":
    main()
