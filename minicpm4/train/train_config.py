"""TrainConfig: every setting of a pretraining or SFT run, read from a JSON/TOML file plus `key=value` overrides.

All checks that need no model or data run in `__post_init__`, so a typo or an impossible value fails before any
compute; `check_model` adds the checks that need the model config (run before the first step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm4.config import ModelConfig
from minicpm4.errors import ConfigError

DECAY_SHAPES = ("exponential", "linear", "cosine")
TASKS = ("pretrain", "sft")


@dataclass
class TrainConfig:
    task: str = "pretrain"  # pretrain: token shards; sft: chat JSONL
    model: str = "tiny"  # a preset name (fresh muP init) or an HF directory / .gguf to continue from
    model_overrides: dict = field(default_factory=dict)  # HF config keys changed on top of `model`
    data: str = ""  # pretrain: a token index (dir or index.json); sft: a chat JSONL file
    decay_data: str = ""  # pretrain: a second token index mixed into the decay phase (same tokenizer)
    decay_mix: float = 0.0  # share of each batch's sequences drawn from decay_data during the decay steps
    tokenizer: str = ""  # default: the token index's tokenizer (pretrain) or the model's (sft)
    out_dir: str = "runs/out/train"  # outputs never land among the scripts in runs/
    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch_size: int = 8  # sequences per forward/backward of one process
    steps: int = 100  # optimizer steps of the whole schedule
    lr: float = 1e-2  # base learning rate (muP: hidden matrices get lr / (width / dim_model_base))
    warmup_steps: int = 10
    decay_steps: int = 10  # the last `decay_steps` steps decay from lr to lr * min_lr_ratio
    decay_shape: str = "exponential"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    init_std: float = 0.1  # muP base init std (MiniCPM's initializer_range)
    mup: bool = True  # False: standard parametrisation (every group at lr, std init_std), for comparisons
    dtype: str = "bf16"  # bf16: autocast over fp32 master weights; fp32: no autocast
    activation_checkpointing: bool = False
    fused_loss: bool = True  # lm_head + cross-entropy in chunks (linear_cross_entropy.py); False: plain logits
    parallel: str = "ddp"  # under torchrun: ddp, or fsdp (FSDP2 fully_shard per layer; uses the plain loss)
    seed: int = 0
    save_every: int = 0  # checkpoint every N steps (0: only at the end and on SIGINT/SIGTERM)
    keep_checkpoints: int = 2
    skip_nonfinite_steps: int = 0  # non-finite loss/grad-norm steps skipped before the run stops (guards.py)
    log_every: int = 1
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    tool_format: str = "json"  # sft: how tool calls are written into assistant turns (minicpm4.text.tool_calls formats)
    mtp_depth: int = 0  # multi-token prediction heads (mtp.py): depth k predicts token t+1+k; 0 = off
    mtp_weight: float = 0.3  # loss = NTP + mtp_weight * mean over depths of the MTP losses
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to OUT/tensorboard (needs `tensorboard`)
    length_buckets: list = field(default_factory=list)  # pretrain: bucket bounds ending at seq_len (length_buckets.py)
    longrope_from: int = 0  # > 0: LongRoPE factors stretching this trained length to max_position_embeddings

    def __post_init__(self) -> None:
        _check_types(self)
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not self.data:
            raise ConfigError("data is required (a token index for pretrain, a chat JSONL file for sft)")
        for name in ("seq_len", "batch_size", "micro_batch_size", "steps", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name, value in vars(self).items():  # nan and inf parse as floats, and pass the range checks below
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        for name in ("warmup_steps", "decay_steps", "save_every", "threads", "weight_decay", "grad_clip",
                     "skip_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "init_std", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps + self.decay_steps > self.steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) + decay_steps ({self.decay_steps}) exceed "
                              f"steps ({self.steps})")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"decay_shape must be one of {', '.join(DECAY_SHAPES)}, got {self.decay_shape!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_shape == "exponential" and self.min_lr_ratio == 0.0 and self.decay_steps:
            raise ConfigError("decay_shape exponential never reaches min_lr_ratio 0; use a positive ratio "
                              "or a linear/cosine decay")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in ("bf16", "fp32"):
            hint = " (fp16 is pathologically slow on CPU and needs loss scaling; use bf16)" if "16" in self.dtype else ""
            raise ConfigError(f"dtype must be bf16 or fp32, got {self.dtype!r}{hint}")
        if not 0.0 <= self.decay_mix <= 1.0:
            raise ConfigError(f"decay_mix must be in [0, 1], got {self.decay_mix}")
        if bool(self.decay_data) != (self.decay_mix > 0) or (self.decay_mix > 0 and not self.decay_steps):
            raise ConfigError(f"decay_data and decay_mix go together, with decay_steps > 0 (got decay_data="
                              f"{self.decay_data!r}, decay_mix={self.decay_mix}, decay_steps={self.decay_steps})")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size})")
        if self.length_buckets:
            from minicpm4.train.length_buckets import check_bounds
            check_bounds(self.length_buckets, self.seq_len)
            if self.task != "pretrain" or self.decay_data:
                raise ConfigError("length_buckets are for pretraining without decay_data (sft packs its own rows)")
        if self.longrope_from < 0:
            raise ConfigError(f"longrope_from must be >= 0, got {self.longrope_from}")

        _check_extras(self)

    def accumulation(self, world: int) -> int:
        """Micro-batches per optimizer step on each of `world` processes."""
        if self.batch_size % (self.micro_batch_size * world):
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size}) x processes ({world})")
        return self.batch_size // (self.micro_batch_size * world)

    def check_model(self, mc: ModelConfig) -> None:
        """Checks that need the model config; raise before any compute."""
        if self.seq_len > mc.max_position_embeddings:
            raise ConfigError(f"seq_len ({self.seq_len}) exceeds the model's max_position_embeddings "
                              f"({mc.max_position_embeddings})")
        if mc.sparse_config is not None:
            dense_len = mc.sparse_config["dense_len"]
            if self.task == "sft":
                raise ConfigError("sft packs documents with a block-diagonal mask, which InfLLM v2 sparse attention "
                                  "does not take; drop sparse_config (model_overrides.sparse_config=null)")
            if dense_len >= self.seq_len:
                raise ConfigError(f"sparse_config.dense_len ({dense_len}) >= seq_len ({self.seq_len}): InfLLM v2 "
                                  "would never engage; lower dense_len or remove sparse_config")
        if self.longrope_from and self.seq_len <= self.longrope_from:
            raise ConfigError(f"seq_len ({self.seq_len}) <= longrope_from ({self.longrope_from}): the stage would "
                              "never train past the original length it extends")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = (), **fixed: Any) -> "TrainConfig":
        """A JSON or TOML file (or nothing), then `key=value` overrides (values parsed as JSON when they parse,
        else taken as strings; `model_overrides.hidden_size=256` sets one nested key), then `fixed` keys."""
        d: dict[str, Any] = {}
        where = "config"
        if path is not None:
            p = Path(path)
            where = str(p)
            try:
                text = p.read_text(encoding="utf-8")
                d = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
            except OSError as e:
                raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
            except (ValueError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'} ({e})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{p}: must hold an object of settings")
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not key=value")
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            head, _, sub = key.partition(".")
            if sub:
                d[head] = {**(d.get(head) or {}), sub: value}
            else:
                d[key] = value
        d.update(fixed)
        return cls.from_dict(d, where)


def _check_extras(cfg: TrainConfig) -> None:
    """The multi-token-prediction and TensorBoard settings."""
    if cfg.mtp_depth < 0 or cfg.mtp_depth >= cfg.seq_len:
        raise ConfigError(f"mtp_depth must be in [0, seq_len), got {cfg.mtp_depth}")
    if cfg.mtp_weight < 0:
        raise ConfigError(f"mtp_weight must be >= 0, got {cfg.mtp_weight}")
    if cfg.mtp_depth and cfg.parallel == "fsdp":
        raise ConfigError("mtp_depth > 0 needs parallel=ddp (under FSDP2 lm_head's weight is sharded outside forward)")
    if cfg.tensorboard:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("tensorboard=true needs the `tensorboard` package: pip install tensorboard "
                              "(or pip install 'minicpm4[train]')")


def _check_types(cfg: TrainConfig) -> None:
    """Each field holds a value of its default's type (an int is accepted for a float field)."""
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = getattr(cfg, f.name)
        kind = type(default)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
              else isinstance(value, int) and not isinstance(value, bool) if kind is int
              else isinstance(value, kind))
        if not ok:
            raise ConfigError(f"{f.name} must be a {kind.__name__}, got {value!r}")
        if kind is float:
            setattr(cfg, f.name, float(value))
