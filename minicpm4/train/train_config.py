"""TrainConfig: every setting of a training run (pretrain, sft, qat, draft), read from a JSON/TOML file plus
`key=value` overrides; the one config of every `minicpm4 train` subcommand.

Settings shared by every task (steps, lr and the WSD schedule, batch sizes, AdamW, checkpoints, metrics) are top-level
keys; those of one task live in its section: `qat` (QATOptions) and `draft` (DraftOptions), set as e.g.
`--set qat.mode=int4`. Each task has its own defaults (TASK_DEFAULTS; the dataclass defaults are pretraining's):
`TrainConfig.load` / `from_dict` / `for_task` apply them to every key the input leaves out, so
`for_task("qat", steps=100)` decays over the last 20 steps as `minicpm4 train qat --steps 100` always did.

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
from minicpm4.train.length_buckets import check_bounds

DECAY_SHAPES = ("exponential", "linear", "cosine")
TASKS = ("pretrain", "sft", "qat", "draft", "rl")
QAT_MODES = ("ternary", "int4", "float")


@dataclass
class QATOptions:
    """The `qat` section: quantization-aware training (train/qat.py)."""
    mode: str = "ternary"  # ternary (BitCPM4, group 32) | int4 (group_size) | float: no fake quantization (baseline)
    group_size: int = 128  # int4 only
    eval_batches: int = 8  # held-out batches of batch_size windows per evaluation


@dataclass
class DraftOptions:
    """The `draft` section: EAGLE draft training against a frozen target (spec/draft_training.py)."""
    ce_weight: float = 0.1  # weight of the token cross-entropy beside the feature regression
    max_windows: int = 64  # distinct windows of seq_len tokens; each costs one target forward, then stays cached
    frspec: str = ""  # FR-Spec vocabulary file: train the head and labels on these ids only
    init: str = ""  # a draft directory to start from (fine-tuning) instead of a copy of the target's last layer
    target_dtype: str = "bf16"  # the frozen target's dtype (the draft trains in fp32)


@dataclass
class RLOptions:
    """The `rl` section: GRPO with chunk-wise rollout (train/rl/objective.py). batch_size counts samples (groups of
    group_size responses), so batch_size / group_size prompts are trained per step."""
    group_size: int = 8  # G responses per prompt (the paper: 16)
    chunk_tokens: int = 256  # tokens each unfinished sample generates per rollout round; = max_len: vanilla rollout
    max_len: int = 512  # response tokens; a sample reaching it is truncated (overlong filtering drops it)
    max_active: int = 0  # unfinished samples in flight at most (engine slots); 0 = this process's batch (batch_size /
    # world)
    stream: bool = True  # chunk-wise rollout on the in-process engine streams each step (train/rl/rollout.py: new
    # groups as slots free, samples still running cut when the batch is complete); false: whole rounds, as on servers
    task: str = "chain"  # the prompt source: chain (train/rl/chain_tasks.py arithmetic word problems) or
    # chain_small (the same with one-digit numbers)
    task_max_steps: int = 32  # chain: most operations per problem (power-law distributed, see chain_tasks.py)
    reward: str = "math"  # math: math_reward of the final boxed answer against the task's (0 if malformed)
    chat_template: bool = True  # wrap each prompt in the tokenizer's chat template (else the bare question)
    eps_low: float = 0.2  # the clip range [1 - eps_low, 1 + eps_high] (clip-higher: eps_low < eps_high)
    eps_high: float = 0.28
    dual_clip_c: float = 3.0  # dual-clip constant (> 1); 0 = off
    kl_coef: float = 0.001  # beta of the k3 KL to the reference; 0 = no reference model
    ref_refresh: int = 0  # copy the policy into the KL reference every N steps; 0 = a fixed reference
    token_level: bool = True  # DAPO token-level averaging (else GRPO's per-sample means)
    chunk_importance: bool = True  # ratio against the log-prob of the chunk's sampling policy (else the step's)
    std_normalize: bool = True  # GRPO advantages divided by the group's std (False: Dr. GRPO)
    overlong_filter: bool = True
    garble_filter: bool = True
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal and roll out more to refill
    max_draws: int = 8  # rollout rounds per step at most before topping the batch up with dropped groups
    eval_prompts: int = 16  # held-out prompts per evaluation (greedy, one response each; reward mean)
    # rollout on OpenAI-compatible servers (train/rl/remote.py; `minicpm4 serve --dtype fp32 --admin-key K`) instead
    # of the in-process engine: base URLs (http://host:port); under torchrun process r takes urls[r::world] when
    # there are at least as many URLs as processes, else all of them
    rollout_urls: list = field(default_factory=list)
    rollout_key_env: str = "MINICPM4_API_KEY"  # the environment variable holding the servers' API key (keys are
    # read from the environment, never written into the saved config)
    rollout_admin_key_env: str = "MINICPM4_ADMIN_KEY"  # ... holding their admin key for weight reloads (unset: the
    # API key)
    rollout_weights_dir: str = ""  # where each step's policy is written for the servers to load (default
    # OUT/rollout_weights); the servers must read it at the same path


SECTIONS = {"qat": QATOptions, "draft": DraftOptions, "rl": RLOptions}


@dataclass
class TrainConfig:
    task: str = "pretrain"  # pretrain: token shards; sft: chat JSONL; qat: a float model on text; draft: EAGLE
    model: str = "tiny"  # a preset name (fresh muP init) or an HF directory / .gguf to continue from (qat: the float
    # model; draft: the frozen target)
    model_overrides: dict = field(default_factory=dict)  # HF config keys changed on top of `model`
    data: str = ""  # pretrain: a token index (dir or index.json); sft: a chat JSONL file; qat: a text file (default
    # the KJV Bible; its last 5% held out); draft: text file(s), a path or a list of paths
    decay_data: str = ""  # pretrain: a second token index mixed into the decay phase (same tokenizer)
    decay_mix: float = 0.0  # share of each batch's sequences drawn from decay_data during the decay steps
    tokenizer: str = ""  # default: the token index's tokenizer (pretrain) or the model's (sft)
    out_dir: str = "runs/out/train"  # the run directory (qat: the exported checkpoint, the run in OUT.qat-run; draft:
    # the draft directory); outputs never land among the scripts in runs/
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
    log_every: int = 1  # a metrics.jsonl record every N steps
    print_every: int = 0  # a progress line to the log every N steps (0: none; evaluations always print one)
    eval_every: int = 0  # held-out evaluation every N steps, before the first and at the last (qat; 0: none)
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    tool_format: str = "json"  # sft: how tool calls are written into assistant turns (minicpm4.text.tool_calls formats)
    mtp_depth: int = 0  # multi-token prediction heads (mtp.py): depth k predicts token t+1+k; 0 = off
    mtp_weight: float = 0.3  # loss = NTP + mtp_weight * mean over depths of the MTP losses
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to OUT/tensorboard (needs `tensorboard`)
    length_buckets: list = field(default_factory=list)  # pretrain: bucket bounds ending at seq_len (length_buckets.py)
    longrope_from: int = 0  # > 0: LongRoPE factors stretching this trained length to max_position_embeddings
    qat: QATOptions = field(default_factory=QATOptions)
    draft: DraftOptions = field(default_factory=DraftOptions)
    rl: RLOptions = field(default_factory=RLOptions)

    def __post_init__(self) -> None:
        for name, kind in SECTIONS.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _section(kind, name, getattr(self, name)))
        _check_types(self)
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not self.data and self.task in ("pretrain", "sft"):
            raise ConfigError("data is required (a token index for pretrain, a chat JSONL file for sft)")
        if isinstance(self.data, list) and self.task != "draft":
            raise ConfigError(f"data: a list of files is for task draft; {self.task} reads one path")
        for name in ("seq_len", "batch_size", "micro_batch_size", "steps", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name, value in vars(self).items():  # nan and inf parse as floats, and pass the range checks below
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        for name in ("warmup_steps", "decay_steps", "save_every", "threads", "weight_decay", "grad_clip",
                     "print_every", "eval_every", "skip_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "init_std", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        # a warmup longer than a run without decay is allowed (the rate never reaches its peak); one that runs
        # into the decay is not
        if self.decay_steps > self.steps or (self.decay_steps and self.warmup_steps + self.decay_steps > self.steps):
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
            check_bounds(self.length_buckets, self.seq_len)
            if self.task != "pretrain" or self.decay_data:
                raise ConfigError("length_buckets are for pretraining without decay_data (sft packs its own rows)")
        if self.longrope_from < 0:
            raise ConfigError(f"longrope_from must be >= 0, got {self.longrope_from}")

        _check_extras(self)
        _check_sections(self)

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
        """The settings in `d`, the task's defaults (TASK_DEFAULTS) for those it leaves out."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**{**task_defaults(d), **d})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:  # a section given as something other than a table
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def for_task(cls, task: str, **settings: Any) -> "TrainConfig":
        """TrainConfig of `task` with its defaults for every setting not given."""
        return cls.from_dict({"task": task, **settings})

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


def task_defaults(d: dict[str, Any]) -> dict[str, Any]:
    """The defaults of d["task"] where they differ from the dataclass's (pretraining's); some follow from settings
    that `d` gives (qat decays over the last 20% of steps, draft from the end of warmup to the last step)."""
    task = d.get("task", "pretrain")
    if task == "qat":  # BitCPM4's re-warmed WSD with a linear decay; the QATConfig defaults before issue 15
        steps = d.get("steps", 200)
        return {"model": "", "out_dir": "runs/out/qat", "steps": 200, "lr": 2e-3, "warmup_steps": 20,
                "decay_steps": max(1, int(0.2 * steps)) if isinstance(steps, int) else 0, "decay_shape": "linear",
                "weight_decay": 0.0, "seq_len": 128, "batch_size": 8, "micro_batch_size": d.get("batch_size", 8),
                "save_every": 100, "eval_every": 50, "fused_loss": False}
    if task == "draft":  # warmup then cosine decay to lr / 10 over the rest
        steps = d.get("steps", 200)
        warmup = d.get("warmup_steps", min(10, steps) if isinstance(steps, int) else 0)
        return {"model": "default", "out_dir": "runs/out/draft", "steps": 200, "lr": 1e-3, "warmup_steps": warmup,
                "decay_steps": max(0, steps - warmup) if isinstance(steps, int) and isinstance(warmup, int) else 0,
                "decay_shape": "cosine", "weight_decay": 0.0, "seq_len": 256, "batch_size": 4,
                "micro_batch_size": d.get("batch_size", 4), "dtype": "fp32", "save_every": 50, "print_every": 10}
    if task == "rl":  # the paper's constant lr 1e-5 (muP); fp32 so the learner's log-probs match the engine's
        return {"model": "default", "out_dir": "runs/out/rl", "steps": 100, "lr": 1e-5, "warmup_steps": 0,
                "decay_steps": 0, "weight_decay": 0.0, "batch_size": 16, "micro_batch_size": 4, "dtype": "fp32",
                "fused_loss": False, "save_every": 10, "print_every": 1}
    return {}


def _section(kind, name: str, d: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)} "
                          f"(known: {', '.join(f'{name}.{k}' for k in sorted(known))})")
    section = kind(**d)
    _check_types(section, name + ".")
    return section


def _check_sections(cfg: TrainConfig) -> None:
    q, dr = cfg.qat, cfg.draft
    if q.mode not in QAT_MODES:
        raise ConfigError(f"qat.mode must be one of {', '.join(QAT_MODES)}, got {q.mode!r}")
    if q.group_size <= 0 or q.eval_batches <= 0:
        raise ConfigError(f"qat.group_size and qat.eval_batches must be positive, got {q.group_size}, {q.eval_batches}")
    if cfg.task == "qat" and cfg.seq_len < 2:
        raise ConfigError(f"qat needs seq_len >= 2, got {cfg.seq_len}")
    if dr.max_windows <= 0 or dr.ce_weight < 0:
        raise ConfigError(f"draft.max_windows must be positive and draft.ce_weight >= 0, got {dr.max_windows}, "
                          f"{dr.ce_weight}")
    if dr.target_dtype not in ("bf16", "fp32", "fp16"):
        raise ConfigError(f"draft.target_dtype must be bf16, fp32 or fp16, got {dr.target_dtype!r}")
    _check_rl(cfg)


RL_TASKS = ("chain", "chain_small")
RL_REWARDS = ("math",)


def _check_rl(cfg: TrainConfig) -> None:
    r = cfg.rl
    for name in ("group_size", "chunk_tokens", "max_len", "task_max_steps", "max_draws", "eval_prompts"):
        if getattr(r, name) <= 0:
            raise ConfigError(f"rl.{name} must be positive, got {getattr(r, name)}")
    for name in ("max_active", "ref_refresh", "kl_coef"):
        if getattr(r, name) < 0:
            raise ConfigError(f"rl.{name} must be >= 0, got {getattr(r, name)}")
    if r.group_size < 2:
        raise ConfigError(f"rl.group_size must be >= 2 (GRPO compares responses within a group), got {r.group_size}")
    if not (0 <= r.eps_low < 1 and r.eps_high >= 0):
        raise ConfigError(f"rl.eps_low must be in [0, 1) and rl.eps_high >= 0, got {r.eps_low}, {r.eps_high}")
    if r.dual_clip_c != 0 and r.dual_clip_c <= 1:
        raise ConfigError(f"rl.dual_clip_c must be > 1 (or 0: off), got {r.dual_clip_c}")
    if r.task not in RL_TASKS:
        raise ConfigError(f"rl.task must be one of {', '.join(RL_TASKS)}, got {r.task!r}")
    if r.reward not in RL_REWARDS:
        raise ConfigError(f"rl.reward must be one of {', '.join(RL_REWARDS)}, got {r.reward!r}")
    bad = [u for u in r.rollout_urls if not (isinstance(u, str) and u.startswith(("http://", "https://")))]
    if bad:
        raise ConfigError(f"rl.rollout_urls must be http(s):// base URLs, got {bad[0]!r}")
    if cfg.task != "rl":
        return
    if cfg.batch_size % r.group_size:
        raise ConfigError(f"batch_size ({cfg.batch_size}, samples per step) must be a multiple of rl.group_size "
                          f"({r.group_size})")
    if cfg.parallel != "ddp":
        raise ConfigError("task rl needs parallel=ddp: the engine rolls out on the whole (unsharded) model")
    if cfg.mtp_depth:
        raise ConfigError("task rl trains no multi-token-prediction heads: set mtp_depth=0")


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


def _check_types(cfg, prefix: str = "") -> None:
    """Each field holds a value of its default's type (an int is accepted for a float field; `data` may be a list
    of paths)."""
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = getattr(cfg, f.name)
        kind = type(default)
        if f.name == "data" and not prefix and isinstance(value, list) and all(isinstance(v, str) for v in value):
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
              else isinstance(value, int) and not isinstance(value, bool) if kind is int
              else isinstance(value, kind))
        if not ok:
            raise ConfigError(f"{prefix}{f.name} must be a {kind.__name__}, got {value!r}")
        if kind is float:
            setattr(cfg, f.name, float(value))
