"""Does a tiny model learn to copy? The check behind BENCHMARKS.md's long-context retrieval notes: a look-up across
distance needs a copy (induction) circuit, and the long stage can only stretch one that already exists.

    python runs/copy_lab.py train SHARDS [--layers 2 --heads 4 --kv-heads 4 --lr 0.02 --steps 1000 --sp
                                         --init-std 0.1 --plain --tie --vocab 0]
    python runs/copy_lab.py probe SHARDS MODEL_DIR ...

train: a fresh model (the `tiny` preset with the vocabulary of SHARDS' tokenizer) on rows of a random 8-40-token
span repeated to 128 tokens (tokens drawn from the SHARDS stream, or from `--vocab N` ids only); prints the mean
loss on positions 64-127, every one of which only a copy predicts (a working look-up takes it near 0; a guess
from the tokens seen in the row, near ln(span)). --plain drops MiniCPM's multipliers (scale_emb 1, logit scale 1,
residual scale 1), --sp uses standard parametrisation, --tie ties the embeddings.
probe: 16 rows of 20 stream tokens, then `gap` other tokens, then the 20 again: mean loss on each copy.
"""

import argparse
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from minicpm4.config import preset
from minicpm4.model import MiniCPM4ForCausalLM
from minicpm4.train.mup import init_weights, param_groups
from minicpm4.train.token_loader import TokenShards


def stream_of(shards: str) -> torch.Tensor:
    s = TokenShards(shards)
    return torch.from_numpy(s.read(0, min(s.total, 1_000_000)).astype(np.int64))


def repeat_rows(pool: torch.Tensor, rows: int, length: int, g: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(rows):
        span = pool[torch.randint(0, len(pool), (int(torch.randint(8, 41, (), generator=g)),), generator=g)]
        out.append(span.repeat(length // len(span) + 1)[:length])
    return torch.stack(out)


def train(a) -> None:
    pool = stream_of(a.shards) if a.vocab == 0 else torch.arange(100, 100 + a.vocab)
    cfg = dataclasses.replace(preset("tiny"), vocab_size=TokenShards(a.shards).index["vocab_size"],
                              num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                              head_dim=128 // a.heads, tie_word_embeddings=a.tie)
    if a.plain:
        cfg = dataclasses.replace(cfg, scale_emb=1, dim_model_base=cfg.hidden_size, scale_depth=a.layers ** 0.5)
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg)
    init_weights(model, a.init_std, not a.sp)
    opt = torch.optim.AdamW(param_groups(model, a.lr, 0.1, a.init_std, not a.sp), betas=(0.9, 0.95))
    g, t0, late = torch.Generator().manual_seed(1), time.time(), []
    for step in range(a.steps):
        x = repeat_rows(pool, 16, 129, g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[:, :-1]).float()
        loss = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # [16, 128]
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        late.append(float(loss[:, 64:].mean().detach()))
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss on positions 64-127 {np.mean(late[-50:]):.2f} ({time.time() - t0:.0f} s)",
                  flush=True)


def probe(a) -> None:
    import minicpm4
    stream, g = stream_of(a.shards), torch.Generator().manual_seed(0)
    for path in a.models:
        model, _ = minicpm4.load(path, dtype="fp32")
        cells = []
        for gap in (0, 60, 400):
            span = stream[torch.randint(0, len(stream), (16, 20), generator=g)]
            filler = stream[torch.randint(0, len(stream), (16, gap), generator=g)]
            ids = torch.cat([torch.ones(16, 1, dtype=torch.long), span, filler, span], 1)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(ids[:, :-1]).float().transpose(1, 2), ids[:, 1:], reduction="none")
            cells.append(f"gap {gap}: 1st {loss[:, :20].mean():.2f} 2nd {loss[:, -19:].mean():.2f}")
        print(path, " | ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("shards")
    for name, kind, default in (("layers", int, 2), ("heads", int, 4), ("kv-heads", int, 4), ("lr", float, 0.02),
                                ("steps", int, 1000), ("init-std", float, 0.1), ("vocab", int, 0)):
        t.add_argument(f"--{name}", type=kind, default=default)
    for flag in ("sp", "plain", "tie"):
        t.add_argument(f"--{flag}", action="store_true")
    p = sub.add_parser("probe")
    p.add_argument("shards")
    p.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train(a) if a.cmd == "train" else probe(a)


if __name__ == "__main__":
    main()
