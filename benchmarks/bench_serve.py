"""Serving throughput: time to first token and aggregate tokens/s at 1, 4 and 16 concurrent streaming clients,
minicpm4's server against llama.cpp's (llama-cpp-python[server]) on the same GGUF, on CPU.

Each server runs alone as a subprocess with --threads compute threads (default 2; ours: `minicpm4 serve --int4`, Q4_1 layers on the int4
kernel, or --dtype bf16 with --ours-dtype; llama.cpp: `python -m llama_cpp.server` on the GGUF's own Q4_1
kernels, with --interrupt_requests False: by default it aborts a running stream when another request arrives). Clients are the openai package's AsyncOpenAI, streaming /v1/chat/completions with greedy decoding,
`max_tokens` new tokens, each client its own question, all started at once. Per run:
  aggregate tok/s = completion tokens of all clients (replies re-tokenized) / wall time of the run
  TTFT            = median over clients of the time from sending to the first content chunk
Each concurrency level runs --repeats times; medians are reported. Last stdout line: one JSON object.

    python benchmarks/bench_serve.py --clients 1,4,16 --max-tokens 64 --repeats 3

Prefix `nice -n -20` on a shared machine (see bench_decode.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOKENIZER = None  # set in main()
QUESTIONS = ["Tell me a story about a lighthouse keeper.", "Explain how rain forms.", "Describe a busy market.",
             "Write a letter to a friend about a trip.", "Explain what a computer does.", "Describe winter in a city.",
             "Tell me about the history of bread.", "Describe a walk in the forest.", "Explain how bees make honey.",
             "Write a short speech for a school day.", "Describe the sea at night.", "Explain how a bicycle works.",
             "Tell me about a famous painter.", "Describe a train journey.", "Explain why the sky is blue.",
             "Write about a day at the beach."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, gguf: Path, port: int, dtype: str, slots: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if kind == "ours":
        quant = ["--int4"] if dtype == "int4" else ["--dtype", dtype]
        cmd = [sys.executable, "-m", "minicpm4.cli", "serve", "--model", str(gguf), *quant, "--port", str(port),
               "--max-batch", str(slots), "--max-model-len", "2048", "--threads", str(threads)]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048", "--verbose", "False",
               "--interrupt_requests", "False"]  # its default drops a running stream when another request comes
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> None:
    """End a server process: SIGTERM, then SIGKILL if it has not exited within 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


async def wait_ready(base: str, proc: subprocess.Popen) -> None:
    import openai
    async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as client:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                await client.models.list()
                return
            except openai.APIConnectionError:
                await asyncio.sleep(0.5)
    raise RuntimeError("server did not start in 5 minutes")


async def one_client(client, question: str, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    ttft, pieces = None, []
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
    # tokens counted the same way for both servers (llama-cpp-python sends no usage when streaming):
    # the reply re-tokenized with the model's own tokenizer
    return (ttft if ttft is not None else float("nan")), len(TOKENIZER.encode("".join(pieces)))


async def measure(base: str, clients: int, max_tokens: int) -> dict:
    import openai
    async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, QUESTIONS[i % len(QUESTIONS)], max_tokens)
                                         for i in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    return {"tok_s": tokens / wall, "ttft_s": statistics.median(t for t, _ in results), "tokens": tokens}


async def bench_server(kind: str, args) -> dict:
    port = free_port()
    proc = start(kind, args.gguf, port, args.ours_dtype, max(args.clients), args.threads)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        await wait_ready(base, proc)
        await measure(base, 1, 8)  # warm-up
        out = {}
        for c in args.clients:
            runs = [await measure(base, c, args.max_tokens) for _ in range(args.repeats)]
            out[c] = {k: statistics.median(r[k] for r in runs) for k in ("tok_s", "ttft_s", "tokens")}
            out[c]["tok_s_runs"] = [r["tok_s"] for r in runs]
            print(f"  {kind:10s} {c:3d} clients: {out[c]['tok_s']:7.1f} tok/s aggregate, "
                  f"TTFT {out[c]['ttft_s']:.3f} s", file=sys.stderr, flush=True)
        return out
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the offline default model's GGUF")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ours-dtype", default="int4", help="int4 (the GGUF's Q4_1 kept 4-bit), bf16 or fp32")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.gguf is None:
        from minicpm4.io.default_model import default_gguf_path
        args.gguf = default_gguf_path()
    global TOKENIZER
    from minicpm4.io.gguf import read_gguf
    TOKENIZER = read_gguf(args.gguf).text_tokenizer()
    results = {"ours": asyncio.run(bench_server("ours", args))}
    if not args.skip_llamacpp:
        results["llama.cpp"] = asyncio.run(bench_server("llama.cpp", args))
    print(f"\n{'clients':>7}  {'peer':10s} {'aggregate tok/s':>16} {'TTFT s':>8}")
    for peer, rows in results.items():
        for c, r in rows.items():
            print(f"{c:>7}  {peer:10s} {r['tok_s']:16.1f} {r['ttft_s']:8.3f}")
    ratios = {}
    ours = results["ours"]
    c_max, c_min = max(args.clients), min(args.clients)
    ratios[f"ours {c_max} / ours {c_min} clients"] = ours[c_max]["tok_s"] / ours[c_min]["tok_s"]
    if "llama.cpp" in results:
        for c in args.clients:
            ratios[f"ours / llama.cpp at {c} clients"] = ours[c]["tok_s"] / results["llama.cpp"][c]["tok_s"]
    for k, v in ratios.items():
        print(f"  {k}: x{v:.2f}")
    print(json.dumps({"gguf": str(args.gguf), "ours_dtype": args.ours_dtype, "max_tokens": args.max_tokens,
                      "repeats": args.repeats, "threads": args.threads, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
