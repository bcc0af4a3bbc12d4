"""The pieces of runs/rl_demo.sh: the SFT data and tokenizer for a tiny policy on chain_tasks, the demo's summary,
and its plots.

    python runs/rl_demo.py data OUT [--train 20000] [--task chain_small]   -> OUT/tokenizer/, OUT/sft.jsonl
    python runs/rl_demo.py summary OUT                -> OUT/summary.json (and stdout): reward and step times per run
    python runs/rl_demo.py plots OUT                  -> OUT/reward.png, OUT/step_time.png (needs matplotlib)

data: chats (user: a chain task's prompt, assistant: its worked answer, one line per operation and \\boxed{answer};
train/rl/chain_tasks.py; --task chain_small: one-digit numbers) from a seed of their own, none with the question
of a held-out RL prompt (the eval stream of train/rl/task_source.py, seed 0), and a byte-level BPE of at most 512
ids (436 on the default data, 445 on chain) trained on them with every digit its own token (so a sum is written
digit by digit, the form a small model can learn to add in) and the ChatML specials.
summary/plots read the three RL runs OUT/{chunk,vanilla,control}/metrics.jsonl.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train.rl.chain_tasks import chain_tasks
from minicpm4.train.rl.task_source import TaskSource

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
RUNS = (("chunk", "chunk-wise rollout"), ("vanilla", "vanilla rollout"), ("control", "control: lr 1e-12 (chunk-wise)"))


def data(out: Path, n: int, held_out: int, small: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    source = TaskSource(None, small=small)  # task() needs no tokenizer
    banned = {source.task(("held-out", i)).question for i in range(held_out)}
    tasks = [t for t in chain_tasks(n, seed=1234, small=small) if t.question not in banned]
    with open(out / "sft.jsonl", "w") as f:
        for t in tasks:
            f.write(json.dumps({"messages": [{"role": "user", "content": t.prompt},
                                             {"role": "assistant", "content": t.worked}]}) + "\n")
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((t.prompt + "\n" + t.worked for t in tasks), trainer)
    Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                        "add_bos_token": True}).save(out / "tokenizer")
    print(f"{len(tasks)} SFT chats ({n - len(tasks)} dropped: a held-out question), tokenizer of "
          f"{backend.get_vocab_size()} ids in {out}", file=sys.stderr)


def rows(out: Path, name: str) -> list[dict]:
    path = out / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def summary(out: Path) -> dict:
    report = {}
    for name, _ in RUNS:
        rs = rows(out, name)
        if not rs:
            continue
        ev = [(r["step"], r["eval_reward"]) for r in rs if "eval_reward" in r]
        train = [r for r in rs if "loss" in r]
        report[name] = {
            "steps": len(train), "eval_reward": ev,
            "eval_first": ev[0][1] if ev else None, "eval_last": ev[-1][1] if ev else None,
            "eval_mean_last_half": statistics.mean(v for s, v in ev[len(ev) // 2:]) if ev else None,
            "reward_rollout_first5": statistics.mean(r.get("reward_rollout", r["reward"]) for r in train[:5]),
            "reward_rollout_last5": statistics.mean(r.get("reward_rollout", r["reward"]) for r in train[-5:]),
            "step_s_median": statistics.median(r["step_s"] for r in train),
            "rollout_s_median": statistics.median(r["rollout_s"] for r in train),
            "step_s_total": sum(r["step_s"] for r in train), "rollout_s_total": sum(r["rollout_s"] for r in train),
            "idle_share_mean": statistics.mean(r["idle_share"] for r in train if "idle_share" in r),
            "response_len_mean": statistics.mean(r["response_len"] for r in train),
            "truncated_mean": statistics.mean(r["truncated"] for r in train),
            "groups_dropped": sum(r["groups_dropped"] for r in train),
        }
    if "chunk" in report and "vanilla" in report:
        c, v = report["chunk"], report["vanilla"]
        report["chunk_vs_vanilla"] = {"steps_per_hour": v["step_s_total"] / c["step_s_total"],
                                      "rollout_time": c["rollout_s_total"] / v["rollout_s_total"]}
    return report


def plots(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, label) in enumerate(RUNS):
        rs = rows(out, name)
        ev = [(r["step"], r["eval_reward"]) for r in rs if "eval_reward" in r]
        train = [r for r in rs if "loss" in r]
        if ev:
            axes[0].plot(*zip(*ev), marker="o", color=f"C{i}", label=f"{label}: held-out (greedy)")
        if train:
            axes[1].plot([r["step"] for r in train], [r.get("reward_rollout", r["reward"]) for r in train],
                         color=f"C{i}", alpha=0.8, label=label)
    axes[0].set(title="reward on held-out prompts", xlabel="step", ylabel="mean reward")
    axes[1].set(title="reward of the step's rollouts (T = 1)", xlabel="step", ylabel="mean reward")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (name, label) in enumerate(RUNS[:2]):
        train = [r for r in rows(out, name) if "loss" in r]
        if train:
            steps = [r["step"] for r in train]
            ax.plot(steps, [r["step_s"] for r in train], color=f"C{i}", label=f"{label}: step")
            ax.plot(steps, [r["rollout_s"] for r in train], color=f"C{i}", ls="--", label=f"{label}: rollout")
    ax.set(title="wall time per step", xlabel="step", ylabel="seconds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("data", "summary", "plots"))
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=20000, help="SFT chats")
    ap.add_argument("--held-out", type=int, default=64, help="held-out RL prompts kept out of the SFT data")
    ap.add_argument("--task", choices=("chain", "chain_small"), default="chain_small", help="the RL task (data)")
    args = ap.parse_args()
    if args.what == "data":
        data(args.out, args.train, args.held_out, args.task == "chain_small")
    elif args.what == "summary":
        report = summary(args.out)
        (args.out / "summary.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report))
    else:
        plots(args.out)


if __name__ == "__main__":
    main()
