"""Chunk-wise against vanilla rollout at equal samples, rollout only (the learner comes with the training loop).

Both modes run the same prompts (chain_tasks: arithmetic word problems with power-law step counts, in the model's
chat template), with the same per-sample seeds, temperature 1, top-p 1, on one Engine of batch_groups x G slots:
  vanilla   chunk_tokens = max_len: each step's round runs batch_groups new prompts until every sample ends (EOS or
            max_len), so the step waits for its longest sample
  chunk     chunk_tokens < max_len: the step streams (rollout.py draw / end_step): the buffer's samples resume,
            a new group is admitted whenever fewer than --active samples are in flight, each sample generates at
            most chunk_tokens in the step, and when batch_groups groups have completed the samples still running
            are cut and wait in the buffer; they resume next step (re-prefilling prompt + generated tokens once)
The policy version increases every step (the weights do not change here: rollout only). One short generation
warms the model up before either mode is timed; the modes run one after the other, so on a shared machine compare
sampled_tok_per_s too (a drop in it is contention, not the rollout scheme).

Reported per mode: rollout seconds per step (mean), groups and samples finished, steps per hour of rollout (wall
time, and per thread CPU second: time.thread_time of the rolling-out thread, which with --threads 1 runs every
kernel, so a loaded machine's waiting is left out), idle
decode slots (1 - busy slot-steps / offered slot-steps, rollout.py), re-prefilled tokens, response-length
percentiles; then chunk / vanilla ratios. A chunk-wise run ends with samples still in its buffer (work started for
later steps): counted, not hidden. The last stdout line is one JSON object with every number.

    python benchmarks/bench_rl.py                                  # default model, 3 steps, 2 groups x 4, 256 / 64
    python benchmarks/bench_rl.py --model OUT/sft/checkpoints/step_0000200/model --steps 16 --groups 4 --g 8 \
        --max-len 512 --chunk 64 --threads 1 --repeats 3           # (BENCHMARKS.md: --steps 8)

The record in BENCHMARKS.md uses the SFT'd tiny policy of `TASK=chain SFT_STEPS=200 bash runs/rl_demo.sh OUT`: its
responses follow the chain format, so their lengths have the task's long tail (median 35 tokens, max ~480).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import minicpm4
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.train.rl.chain_tasks import chain_tasks
from minicpm4.train.rl.rollout import ChunkRollout, RolloutSettings, idle_share


def prompt_source(tokenizer, n: int, seed: int):
    for i, task in enumerate(chain_tasks(n, seed=seed)):
        text = tokenizer.apply_chat_template([{"role": "user", "content": task.prompt}])
        yield i, tokenizer.encode(text)


def run_mode(model, tokenizer, args, chunk: int) -> dict:
    g, groups_per_step = args.g, args.groups
    settings = RolloutSettings(group_size=g, chunk_tokens=chunk, max_len=args.max_len, seed=args.seed)
    ro = ChunkRollout(Engine(model, max_slots=groups_per_step * g), settings)
    active = groups_per_step * g if chunk >= args.max_len else args.active or groups_per_step * g
    source = prompt_source(tokenizer, 10_000, args.seed)
    step_s, step_cpu, lengths, carry = [], [], [], []
    t_all = time.perf_counter()
    for step in range(args.steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        got = carry
        while len(got) < groups_per_step:
            got += ro.draw(source, version=step, max_active=active, groups=groups_per_step - len(got))
        ro.end_step()
        batch, carry = got[:groups_per_step], got[groups_per_step:]
        step_s.append(time.perf_counter() - t0)
        step_cpu.append(time.thread_time() - c0)
        lengths += [len(s.tokens) for grp in batch for s in grp.samples]
        print(f"  chunk={chunk} step {step}: {step_s[-1]:.1f} s, {len(ro.history)} draws so far, "
              f"{ro.active} unfinished in the buffer", flush=True)
    h = ro.history
    busy, offered = sum(r.busy for r in h), sum(r.offered for r in h)
    q = statistics.quantiles(lengths, n=10) if len(lengths) > 1 else lengths * 9
    return {"chunk_tokens": chunk, "rollout_s": time.perf_counter() - t_all, "step_s_mean": statistics.mean(step_s),
            "steps_per_hour": 3600 / statistics.mean(step_s), "cpu_s_per_step": statistics.mean(step_cpu),
            "steps_per_cpu_hour": 3600 / statistics.mean(step_cpu), "draws": len(h),
            "samples_trained": len(lengths), "samples_left_in_buffer": ro.active,
            "tokens_sampled": sum(r.tokens for r in h),
            "sampled_tok_per_s": sum(r.tokens for r in h) / max(sum(r.wall_s for r in h), 1e-9),
            "prefill_tokens": sum(r.prefill_tokens for r in h),
            "idle_share": idle_share(busy, 1, offered), "truncated_share": sum(x >= args.max_len for x in lengths)
            / len(lengths), "len_p50": q[4], "len_p90": q[8], "len_max": max(lengths)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--groups", type=int, default=2, help="groups (prompts) per training step")
    ap.add_argument("--g", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--active", type=int, default=0, help="chunk mode: samples in flight before a new group is "
                    "admitted (rl.max_active), on the engine's groups x g slots; 0: groups x g")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="load dtype: auto, bf16, fp32")
    ap.add_argument("--int4", action="store_true", help="keep the GGUF's Q4_1 weights 4-bit (the fast CPU decode)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="runs of both modes, alternated; reported: the repeat "
                    "with the median ratio (the lower one of an even count)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = minicpm4.load(args.model, dtype=args.dtype, int4=args.int4)
    # warm-up outside the timings: kernels built or loaded, caches allocated, before the first mode runs
    _, warm = next(prompt_source(tokenizer, 1, args.seed))
    Engine(model).generate([warm], SamplingParams(max_new_tokens=8))
    runs = {"vanilla": [], "chunk": []}
    for rep in range(args.repeats):  # alternating, so drifting load on a shared machine hits both modes alike
        for name, chunk in (("vanilla", args.max_len), ("chunk", args.chunk)):
            print(f"{name} (repeat {rep + 1}/{args.repeats}): chunk_tokens={chunk}", flush=True)
            runs[name].append(run_mode(model, tokenizer, args, chunk))
            print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in runs[name][-1].items()), flush=True)
    # each repeat runs the same prompts and seeds: the samples are identical, only the timings vary
    per_repeat = [c["steps_per_hour"] / v["steps_per_hour"] for v, c in zip(runs["vanilla"], runs["chunk"])]
    cpu = sorted(c["steps_per_cpu_hour"] / v["steps_per_cpu_hour"] for v, c in zip(runs["vanilla"], runs["chunk"]))
    mid = sorted(range(args.repeats), key=per_repeat.__getitem__)[(args.repeats - 1) // 2]  # the (lower) median
    v, c = runs["vanilla"][mid], runs["chunk"][mid]
    ratios = {"steps_per_hour": per_repeat[mid], "steps_per_hour_each": per_repeat,
              "steps_per_cpu_hour": cpu[(args.repeats - 1) // 2], "steps_per_cpu_hour_each": cpu,
              "idle_share": c["idle_share"] / v["idle_share"] if v["idle_share"] else None}
    print(f"chunk / vanilla: steps per hour x{ratios['steps_per_hour']:.2f} (the median repeat of {args.repeats}: "
          f"{', '.join(f'{x:.2f}' for x in per_repeat)}); per thread CPU second x{ratios['steps_per_cpu_hour']:.2f} "
          f"(median: {', '.join(f'{x:.2f}' for x in cpu)}), idle decode slots {c['idle_share']:.1%} vs "
          f"{v['idle_share']:.1%}")
    print(json.dumps({"bench": "rl_rollout", "args": vars(args), "vanilla": v, "chunk": c, "ratios": ratios}))


if __name__ == "__main__":
    main()
