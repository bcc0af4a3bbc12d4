"""The language-modelling objective of pretraining and SFT (objective.py's seam), and its loss for QAT.

Batches come from a loader (token_loader.py's packed shards, length buckets or the decay mix for pretraining,
chat_data.py's packed conversations for SFT): {"input_ids", "labels", "segments"?} [B, T] with labels[:, t] the
target of position t (IGNORE where none). A micro-batch's summed token cross-entropy is scaled by
world / (target tokens in the global batch), so after DDP's gradient average the gradient is exactly that of the
mean loss over every target token of the global batch, whatever the split over processes and micro-batches.
With mtp_depth > 0 the multi-token-prediction heads (mtp.py) add their weighted losses, each scaled the same way by
its own global target count; the logged `loss` stays the next-token loss, `mtp_loss` is the mean over depths.
Parameters train in muP groups (mup.py); the checkpoints' model directory is the HF model, MTP heads go to state.pt.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from minicpm4.config import PRESETS, ModelConfig, preset
from minicpm4.errors import ConfigError
from minicpm4.io.loader import load, merge_overrides
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train import mtp as mtp_heads, process_group as pg
from minicpm4.train.chat_data import ChatLoader
from minicpm4.train.checkpoint import write_model_dir
from minicpm4.train.length_buckets import BucketLoader
from minicpm4.train.linear_cross_entropy import IGNORE
from minicpm4.train.longrope import extend_rope
from minicpm4.train.mup import init_weights, param_groups
from minicpm4.train.objective import Objective
from minicpm4.train.token_loader import DecayMix, PackedLoader, TokenShards
from minicpm4.train.train_config import TrainConfig


class LanguageModeling(Objective):
    def __init__(self, cfg: TrainConfig, model: MiniCPM4ForCausalLM, tokenizer: Tokenizer | None, loader):
        super().__init__(cfg)
        self.model, self.config, self.tokenizer, self.loader = model, model.config, tokenizer, loader

    @classmethod
    def from_config(cls, cfg: TrainConfig, rank: int, world: int) -> "LanguageModeling":
        """Everything that can fail on bad input, before any compute: the model (a preset gets a fresh muP init once
        the vocabulary is known), the tokenizer and the loader of cfg.task."""
        model, tokenizer, fresh = None, None, cfg.model in PRESETS
        if not fresh:
            model, tokenizer = load(cfg.model, dtype="fp32", config_overrides=cfg.model_overrides or None)
        if cfg.tokenizer:
            tokenizer = Tokenizer.from_dir(cfg.tokenizer)
        if cfg.task == "pretrain":
            shards = TokenShards(cfg.data)
            tokenizer = tokenizer or Tokenizer.from_dir(shards.tokenizer_dir)
            if cfg.length_buckets:  # the long-context stage: one document per row, rows of similar length
                loader = BucketLoader(shards, cfg.seq_len, cfg.batch_size, cfg.length_buckets, cfg.seed, rank, world)
            else:
                loader = PackedLoader(shards, cfg.seq_len, cfg.batch_size, cfg.seed, rank, world)
            data_vocab = shards.vocab_size
            if cfg.decay_data:
                extra = TokenShards(cfg.decay_data)
                decay = PackedLoader(extra, cfg.seq_len, cfg.batch_size, cfg.seed + 1, rank, world)
                loader = DecayMix(loader, decay, cfg.decay_mix, cfg.steps - cfg.decay_steps)
                data_vocab = max(data_vocab, extra.vocab_size)
        elif cfg.task == "sft":
            if tokenizer is None:
                raise ConfigError("sft needs a tokenizer: start from a model directory or set tokenizer")
            loader = ChatLoader(cfg.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed, rank, world,
                                cfg.tool_format)
            data_vocab = tokenizer.vocab_size
        else:
            raise ConfigError(f"language modelling trains task pretrain or sft, not {cfg.task!r}")
        if fresh:
            special = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id}
            mc = ModelConfig.from_dict(merge_overrides(preset(cfg.model).to_dict(), {**special, **cfg.model_overrides}))
            torch.manual_seed(cfg.seed)
            model = MiniCPM4ForCausalLM(mc)
            init_weights(model, cfg.init_std, cfg.mup)
        if cfg.longrope_from:  # LongRoPE factors stretching the trained length to max_position_embeddings
            extend_rope(model, cfg.longrope_from)
        if data_vocab > model.config.vocab_size:
            raise ConfigError(f"the data's vocabulary ({data_vocab}) is larger than the model's vocab_size "
                              f"({model.config.vocab_size})")
        cfg.check_model(model.config)
        if cfg.mtp_depth:
            mtp_heads.attach(model, cfg.mtp_depth, cfg.init_std, cfg.mup, cfg.seed)
        if cfg.activation_checkpointing:
            checkpoint_layers(model)
        return cls(cfg, model.train(), tokenizer, loader)

    def param_groups(self) -> list[dict]:
        cfg = self.cfg
        return param_groups(self.model, cfg.lr, cfg.weight_decay, cfg.init_std, cfg.mup)

    def next_batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.loader.next_batch()

    def counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[next-token targets, targets of each MTP depth]."""
        n = (batch["labels"] != IGNORE).sum().double()[None]
        if not self.cfg.mtp_depth:
            return n
        return torch.cat([n, mtp_heads.target_counts(batch, self.cfg.mtp_depth)])

    def loss(self, net, mb, counts, world):
        """sums: [next-token CE, CE of each MTP depth], summed over the micro-batch's targets."""
        fused = self.cfg.fused_loss and not pg.sharded(self.model)  # FSDP2: lm_head is sharded outside forward
        if fused or self.cfg.mtp_depth:  # fused: head + loss in chunks (linear_cross_entropy.py)
            h = net(mb["input_ids"], segments=mb.get("segments"), hidden_only=True)
            ce = mtp_heads.head_loss(h, self.model.lm_head.weight, mb["labels"], fused)
        else:
            logits = net(mb["input_ids"], segments=mb.get("segments"))
            ce = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
        objective = ce * (world / counts[0].float())
        sums = ce.detach().double()[None]
        if self.cfg.mtp_depth:
            n_mtp = counts[1:].clamp(min=1)
            term, mtp_sums = mtp_heads.objective(self.model, h, mb, n_mtp, self.cfg.mtp_weight, world, fused)
            objective, sums = objective + term, torch.cat([sums, mtp_sums.to(sums.device)])
        return objective, sums

    def metrics(self, sums, counts):
        out = {"loss": (sums[0] / counts[0]).item()}
        if self.cfg.mtp_depth:
            out["mtp_loss"] = (sums[1:] / counts[1:].clamp(min=1)).mean().item()
        return out

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def split_state(self, state):
        return mtp_heads.split_state(state)  # MTP heads: state.pt, not the HF model

    def save_model(self, directory: Path, state):
        write_model_dir(directory, self.config, state, self.tokenizer)

    def load_model(self, state, extra):
        if self.config.tie_word_embeddings:  # the HF file omits the tied head
            state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
        self.model.load_state_dict({**state, **extra})


def checkpoint_layers(model: MiniCPM4ForCausalLM) -> None:
    """Activation checkpointing: each decoder layer keeps only its input and recomputes the rest in backward."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
