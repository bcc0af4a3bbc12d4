"""Why P-GPTQ loses to GPTQ on the default model: activation norms at the first positions, and a causal check.

1. Input L2 norm of every linear layer at positions 0-3 against the median position >= 4 (one held-out window).
2. RTN, GPTQ and P-GPTQ (int4 g64 sym, calibrated on --calib x 256 KJV tokens from Genesis on, weights
   dequantized into an fp32 copy): perplexity of positions >= 4 of --eval held-out windows, once with the
   quantized model computing positions 0-3 itself and once with the float model's keys / values for them
   (prefilled into the KV cache). If P-GPTQ recovers with a float prefix, its loss is in the first positions.

    python benchmarks/pgptq_probe.py            # a few minutes idle
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os

import torch
from torch import nn

import minicpm4
from minicpm4.corpus import kjv_text
from minicpm4.model.kv_cache import KVCache
from minicpm4.quant.gptq import calibrate, quantize_model_weights
from minicpm4.quant.primitives import dequantize

SKIP, LEN = 4, 256


@torch.no_grad()
def input_norm_ratios(model: nn.Module, names: list[str], window: torch.Tensor) -> dict[str, float]:
    """name -> |x at position 0| / median |x at positions >= SKIP| of the layer's input."""
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, i, _o, n=n: inputs.__setitem__(n, i[0][0]))
             for n in names]
    model(window[None])
    for h in hooks:
        h.remove()
    return {n: (x.norm(dim=-1)[0] / x.norm(dim=-1)[SKIP:].median()).item() for n, x in inputs.items()}


@torch.no_grad()
def tail_nll(model: nn.Module, prefix_model: nn.Module, w: torch.Tensor) -> float:
    """Mean NLL of the tokens after position SKIP; positions < SKIP computed by prefix_model (into the cache)."""
    cache = KVCache(model.config, 1, w.shape[0], dtype=torch.float32)
    prefix_model(w[None, :SKIP], cache=cache)
    logits = model(w[None, SKIP:], positions=torch.arange(SKIP, w.shape[0])[None], cache=cache)
    return nn.functional.cross_entropy(logits[0, :-1], w[SKIP + 1:]).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=8, help="calibration sequences of 256 tokens")
    ap.add_argument("--eval", type=int, default=2, help="held-out windows of 256 tokens")
    args = ap.parse_args()
    torch.set_num_threads(2)
    fp32, tok = minicpm4.load("default", dtype="fp32")
    verses = kjv_text().split("\n")
    bos = tok.bos_token_id
    ids, ev = tok.encode("\n".join(verses[:3000])), tok.encode("\n".join(verses[-3000:]))
    calib = [torch.tensor([[bos] + ids[i * LEN:(i + 1) * LEN - 1]]) for i in range(args.calib)]
    wins = [torch.tensor([bos] + ev[i * LEN:(i + 1) * LEN - 1]) for i in range(args.eval)]
    names = [n for n, m in fp32.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]

    ratios = input_norm_ratios(fp32, names, wins[0])
    print("input norm at BOS / median of positions >= 4, largest per layer kind:")
    for kind in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        worst = max((n for n in names if n.endswith(kind)), key=ratios.get)
        print(f"  {kind:<10} {ratios[worst]:8.1f}x  ({worst})")

    hessians = calibrate(fp32, calib, names, skip_prefix=SKIP)
    models = {"float": fp32}
    for method in ("rtn", "gptq", "pgptq"):
        m = copy.deepcopy(fp32)
        for n, q in quantize_model_weights(fp32, hessians, method, 4, 64).items():
            m.get_submodule(n).weight.data = dequantize(q)
        models[method] = m
    ppl = {}
    for name, m in models.items():
        own = sum(tail_nll(m, m, w) for w in wins) / len(wins)
        flt = sum(tail_nll(m, fp32, w) for w in wins) / len(wins)
        ppl[name] = {"own_prefix": math.exp(own), "float_prefix": math.exp(flt)}
        print(f"{name:<6} ppl of positions >= {SKIP}: own prefix {ppl[name]['own_prefix']:7.2f}, "
              f"float prefix {ppl[name]['float_prefix']:7.2f}", flush=True)
    print(json.dumps({"bos_norm_ratio": ratios, "tail_ppl": ppl, "calib": args.calib, "eval": args.eval,
                      "loadavg_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
