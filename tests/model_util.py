"""A randomly initialised model whose weights are far from init (norm gains near 1, weights ~0.08): what
the engine, speculative and kernel tests run on."""

import torch

from minicpm4.config import ModelConfig
from minicpm4.model.decoder import MiniCPM4ForCausalLM


def random_model(cfg: ModelConfig, seed: int = 0) -> MiniCPM4ForCausalLM:
    torch.manual_seed(seed)
    m = MiniCPM4ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in name else 0.08) + (1.0 if "norm" in name else 0.0))
    return m.eval()
