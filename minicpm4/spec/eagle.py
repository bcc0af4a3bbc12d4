"""The MiniCPM4 EAGLE draft head: one decoder layer that predicts the target's next hidden state.

    e      = RMSNorm1(embed(x_{t+1}) * scale_emb)            the token sampled from position t
    f      = RMSNorm2(feature_t)                               the target's final-normed hidden state at t
    h      = fc1(e) + fc2(f)                                   two hidden->hidden linears, summed
    g      = DecoderLayer(h)                                   one MiniCPM layer (RoPE at position t, residual
                                                               branches scaled by scale_depth/sqrt(mup_denominator))
    logits = lm_head(g / (hidden_size / dim_model_base))      the target's head; g approximates feature_{t+1}

fc1 and fc2 are stored as one `model.fc` Linear(2*hidden -> hidden) acting on cat(e, f) (fc = [fc1 | fc2]),
which is the layout of the official MiniCPM EAGLE checkpoints (vLLM `minicpm_eagle.py`: `model.fc`,
`model.input_norm1`, `model.input_norm2`, `model.eagle_layers.{i}.*`; their `model.embed_tokens`, `lm_head` and
unused `model.norm` are skipped here because the draft shares the target's). Our own drafts are written in the
same layout with a config.json (target shapes, num_hidden_layers = draft layers, mup_denominator).

FR-Spec: `bind(target, vocab)` gives the draft a head of only the rows `vocab` (frequent token ids) gathered from
the target's lm_head; the draft's logits then index into `vocab`, and `full_ids` maps them back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn

from minicpm4.config import ModelConfig
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.fileio import atomic_write_text
from minicpm4.model.decoder import AttnContext, DecoderLayer, MiniCPM4ForCausalLM, RMSNorm, RotaryEmbedding, run_layers
from minicpm4.model.kv_cache import KVCache
from minicpm4.model.native_stack import NativeDecoder
from minicpm4.weights import checkpoint_files, load_into, read_state_dict, save_state_dict

DRAFT_ARCH = "EagleMiniCPMForCausalLM"
# tensors an official draft checkpoint may carry that this draft takes from the target (or never uses)
SHARED = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")


class EagleBody(nn.Module):
    """The `model.` prefix of a draft checkpoint."""

    def __init__(self, config: ModelConfig, layer_config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.input_norm1 = RMSNorm(h, config.rms_norm_eps)
        self.input_norm2 = RMSNorm(h, config.rms_norm_eps)
        self.eagle_layers = nn.ModuleList(DecoderLayer(layer_config, i) for i in range(config.num_hidden_layers))
        self.rotary_emb = RotaryEmbedding(config)


class EagleDraft(nn.Module):
    def __init__(self, config: ModelConfig, mup_denominator: int):
        super().__init__()
        self.config, self.mup_denominator = config, mup_denominator
        # DecoderLayer scales its branches by scale_depth/sqrt(num_hidden_layers); the draft wants
        # scale_depth/sqrt(mup_denominator) (the target's depth), so the layers get a rescaled scale_depth
        layer_config = dataclasses.replace(
            config, scale_depth=config.scale_depth * math.sqrt(config.num_hidden_layers / mup_denominator))
        self.model = EagleBody(config, layer_config)
        self.vocab: torch.Tensor | None = None  # FR-Spec token ids of the head rows, or None (full vocabulary)
        self._shared: tuple = ()  # (embed_tokens, head, scale_emb): the target's, kept out of state_dict
        self.native: NativeDecoder | None = None  # set by fuse() when the C++ stack fits

    # ---- construction ----
    @classmethod
    def for_target(cls, target: MiniCPM4ForCausalLM, layers: int = 1, seed: int = 0) -> "EagleDraft":
        """A new draft for `target`: the layer starts as a copy of the target's last layer, fc passes the
        feature through (fc2 = identity, fc1 small random), so training starts from a sensible predictor."""
        cfg = dataclasses.replace(target.config, model_type="minicpm", num_hidden_layers=layers,
                                  architectures=[DRAFT_ARCH], sparse_config=None, tie_word_embeddings=False)
        if target.fused:
            raise ConfigError("a new draft copies the target's last layer: load the target unfused")
        draft = cls(cfg, target.config.num_hidden_layers)
        h = cfg.hidden_size
        g = torch.Generator().manual_seed(seed)
        last = target.model.layers[-1].state_dict()
        with torch.no_grad():
            draft.model.fc.weight.copy_(torch.cat([torch.randn(h, h, generator=g) * 0.1 / math.sqrt(h),
                                                   torch.eye(h)], dim=1))
            for layer in draft.model.eagle_layers:
                layer.load_state_dict({k: v.float() for k, v in last.items()})
        return draft.bind(target)

    def bind(self, target: MiniCPM4ForCausalLM, vocab: torch.Tensor | None = None) -> "EagleDraft":
        """Share the target's embedding and head; with `vocab` (FR-Spec ids), a head of only those rows."""
        if target.config.hidden_size != self.config.hidden_size:
            raise ConfigError(f"draft hidden_size {self.config.hidden_size} does not match the target's "
                              f"{target.config.hidden_size}")
        head = target.lm_head
        if vocab is not None:
            vocab = vocab.long()
            if int(vocab.max()) >= target.config.vocab_size or int(vocab.min()) < 0:
                raise ConfigError(f"FR-Spec vocabulary has ids outside the target's {target.config.vocab_size}")
            full = head.weight if isinstance(head, nn.Linear) else head.dequantize()
            head = nn.Linear(full.shape[1], vocab.numel(), bias=False, device="meta")
            head.weight = nn.Parameter(full.detach()[vocab].to(target.model.embed_tokens.weight.dtype),
                                       requires_grad=False)
        self.vocab, self._shared = vocab, (target.model.embed_tokens, head, target.config.scale_emb)
        return self

    def fuse(self) -> "EagleDraft":
        """Inference only: q/k/v and gate/up in one weight each (see MiniCPM4ForCausalLM.fuse_projections), and
        the layers as one C++ call (model/native_stack.py) for cached passes when the weights are bf16."""
        for layer in self.model.eagle_layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self.native = NativeDecoder.for_layers(self.config, self.model.eagle_layers)
        return self

    def full_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Head-row indices -> token ids of the full vocabulary."""
        return idx if self.vocab is None else self.vocab[idx]

    # ---- forward ----
    def forward(self, ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] (x_{t+1}), features [B, T, H] (feature_t), positions [B, T] (t).

        Without a cache: plain causal attention over the T pairs (training). With a cache: the pairs go to
        slots start..start+T-1 and attend as mask [B, T, start+T] says (drafting a tree).
        Returns head logits [B, T, V'] fp32 (V' = len(vocab) with FR-Spec) and g [B, T, H].
        """
        embed, head, scale_emb = self._shared
        m = self.model
        dtype = m.fc.weight.dtype
        e = m.input_norm1((embed(ids) * scale_emb).to(dtype))
        h = m.fc(torch.cat([e, m.input_norm2(features.to(dtype))], dim=-1))
        t = ids.shape[1]
        if cache is None:
            ctx, contiguous_from, kv_len = AttnContext(positions, t, None, True), None, t
        else:
            ctx, contiguous_from, kv_len = AttnContext(positions, start + t, mask[:, None], False, cache), start, start + t
        cos, sin = m.rotary_emb(positions, kv_len)
        h = run_layers(self.native, m.eagle_layers, h, cos, sin, ctx, contiguous_from,
                       torch.arange(start, start + t)[None])  # the C++ stack only with a cache (usable checks)
        x = h if self.config.logit_scale == 1.0 else h / self.config.logit_scale
        return head(x.to(embed.weight.dtype)).float(), h

    def new_cache(self, max_len: int, dtype: torch.dtype) -> KVCache:
        return KVCache(self.config, 1, max_len, dtype)

    # ---- files ----
    def save(self, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """config.json and model.safetensors (`state`: default this draft's state dict) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {**self.config.to_dict(), "mup_denominator": self.mup_denominator}
        save_state_dict(self.state_dict() if state is None else state, out, tied=False)
        atomic_write_text(out / "config.json", json.dumps(cfg, indent=2))
        return out


def is_draft_dir(path: str | Path) -> bool:
    """Whether `path` holds an EAGLE draft (its config names an Eagle architecture, or its checkpoint has
    `model.fc.weight`) rather than a plain model, which can only serve as a chain draft."""
    p = Path(path)
    try:
        cfg = json.loads((p / "config.json").read_text())
        if any("eagle" in a.lower() for a in cfg.get("architectures") or []):
            return True
        from safetensors import safe_open
        return any("model.fc.weight" in safe_open(str(f), framework="pt").keys() for f in checkpoint_files(p))
    except (OSError, json.JSONDecodeError, CheckpointError):
        return False


def load_draft(path: str | Path, target: MiniCPM4ForCausalLM, vocab: torch.Tensor | None = None) -> EagleDraft:
    """Read a draft directory (ours or the official layout) in the target's dtype and bind it to the target."""
    p = Path(path)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{p}: no config.json for the draft")
    raw = json.loads(cfg_path.read_text())
    cfg = dataclasses.replace(ModelConfig.from_dict(raw), tie_word_embeddings=False)  # the head is the target's
    mup = int(raw.get("mup_denominator", cfg.num_hidden_layers))
    dtype = target.model.embed_tokens.weight.dtype
    state = {k: v for k, v in read_state_dict(checkpoint_files(p), dtype).items() if k not in SHARED}
    with torch.device("meta"):
        draft = EagleDraft(cfg, mup)
    draft.model.rotary_emb = RotaryEmbedding(cfg)  # buffers computed on the CPU, not loaded
    load_into(draft, state, str(p))
    return draft.eval().bind(target, vocab)
