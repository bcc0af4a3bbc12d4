"""ModelConfig: one dataclass read from a Hugging Face config.json, keeping HF key names.

`from_dict` only filters and checks keys, it never renames them, so a config written by
`to_dict` is a valid HF config again. Defaults are the official MiniCPM ones
(configuration_minicpm.py): scale_emb=1, dim_model_base=1, scale_depth=1, tied embeddings.

A Llama checkpoint is the special case scale_emb=1, scale_depth=sqrt(L), dim_model_base=hidden:
then the residual multiplier scale_depth/sqrt(L) and the logit divisor hidden/dim_model_base are 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm4.errors import ConfigError

MODEL_TYPES = ("minicpm", "minicpm4", "llama")

# InfLLM v2 defaults from the MiniCPM4 README; kept here so the sparse-attention code reads one place.
SPARSE_DEFAULTS = dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64,
                       window_size=2048, topk=64, use_nope=False, dense_len=8192)


@dataclass(frozen=True)
class SparseConfig:
    """The HF `sparse_config` block (same keys, same defaults as SPARSE_DEFAULTS)."""
    kernel_size: int = SPARSE_DEFAULTS["kernel_size"]
    kernel_stride: int = SPARSE_DEFAULTS["kernel_stride"]
    init_blocks: int = SPARSE_DEFAULTS["init_blocks"]
    block_size: int = SPARSE_DEFAULTS["block_size"]
    window_size: int = SPARSE_DEFAULTS["window_size"]
    topk: int = SPARSE_DEFAULTS["topk"]
    use_nope: bool = SPARSE_DEFAULTS["use_nope"]
    dense_len: int = SPARSE_DEFAULTS["dense_len"]  # -1: always sparse

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)
        for name in ("kernel_size", "kernel_stride", "block_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"sparse_config.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("init_blocks", "window_size", "topk"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"sparse_config.{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not is_int(self.dense_len) or self.dense_len < -1:
            raise ConfigError(f"sparse_config.dense_len must be an integer >= -1 (-1 = always sparse), "
                              f"got {self.dense_len!r}")
        if not isinstance(self.use_nope, bool):
            raise ConfigError(f"sparse_config.use_nope must be true or false, got {self.use_nope!r}")
        for a, b in (("kernel_size", "kernel_stride"), ("block_size", "kernel_stride"), ("window_size", "block_size")):
            if getattr(self, a) % getattr(self, b):
                raise ConfigError(f"sparse_config.{a} ({getattr(self, a)}) must be a multiple of "
                                  f"{b} ({getattr(self, b)})")
        if self.topk + self.local_blocks < 1:
            raise ConfigError("sparse_config: topk + window_size/block_size must be at least 1 "
                              "(otherwise a query selects no block)")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SparseConfig":
        d = dict(d or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown sparse_config key(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(known)})")
        return cls(**d)

    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    def n_select(self, n_blocks: int) -> int:
        """K: blocks kept per query (top-k plus the local window, at most every block)."""
        return min(self.topk + self.local_blocks, n_blocks)


def as_config(cfg: SparseConfig | dict | None) -> SparseConfig:
    return cfg if isinstance(cfg, SparseConfig) else SparseConfig.from_dict(cfg)


@dataclass
class ModelConfig:
    vocab_size: int = 73448
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # None -> num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # LongRoPE: rope_type/type, long_factor, short_factor, original_max_position_embeddings
    rms_norm_eps: float = 1e-6
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: float = 1.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    sparse_config: dict | None = None
    model_type: str = "minicpm"
    architectures: list[str] | None = None
    torch_dtype: str | None = None
    # every other key of the source config.json, written back unchanged by to_dict
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        if self.sparse_config is not None:
            if not isinstance(self.sparse_config, dict):
                raise ConfigError(f"sparse_config must be a mapping, got {self.sparse_config!r}")
            self.sparse_config = {**SPARSE_DEFAULTS, **self.sparse_config}
            SparseConfig.from_dict(self.sparse_config)

    def _check_rope_scaling(self) -> None:
        rs = self.rope_scaling
        kind = rs.get("rope_type", rs.get("type"))
        if kind in (None, "default"):
            self.rope_scaling = None
            return
        if kind != "longrope":
            raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: 'longrope')")
        half = self.head_dim // 2
        for key in ("long_factor", "short_factor"):
            factors = rs.get(key)
            if not isinstance(factors, list) or len(factors) != half:
                got = len(factors) if isinstance(factors, list) else factors
                raise ConfigError(f"rope_scaling.{key} must be a list of head_dim/2 = {half} floats, got {got!r}")
        if not rs.get("original_max_position_embeddings"):
            raise ConfigError("rope_scaling.original_max_position_embeddings is required for longrope")

    # ---- derived multipliers (muP / depth scaling), the one place they are computed ----
    @property
    def residual_scale(self) -> float:
        """Each residual branch is multiplied by scale_depth / sqrt(L)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        """The final hidden state is divided by hidden_size / dim_model_base before lm_head."""
        return self.hidden_size / self.dim_model_base

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if "model_type" not in d:
            raise ConfigError("config has no model_type")
        if d["model_type"] == "llama":
            # A Llama model is MiniCPM with every muP multiplier equal to 1.
            d.update(scale_emb=1.0, scale_depth=math.sqrt(d.get("num_hidden_layers", 1)),
                     dim_model_base=d.get("hidden_size", 1))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs)
        except TypeError as e:  # a wrong type reached arithmetic in __post_init__
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {k: v for k, v in d.items() if v is not None}
        d.update(self.extra)
        if self.model_type == "llama":  # keep a llama config loadable by transformers, unchanged
            for k in ("scale_emb", "scale_depth", "dim_model_base"):
                d.pop(k)
        if not d.get("architectures"):
            d["architectures"] = ["LlamaForCausalLM" if self.model_type == "llama" else "MiniCPMForCausalLM"]
        return d


# ---- presets (shapes from the MiniCPM4 configs; weights come from checkpoints) ----
def minicpm4_0_5b() -> ModelConfig:
    return ModelConfig(vocab_size=73448, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                       scale_emb=12, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=True,
                       eos_token_id=[2, 73440])


def minicpm4_8b() -> ModelConfig:
    return ModelConfig(vocab_size=73448, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=2, max_position_embeddings=32768,
                       scale_emb=12, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=False,
                       eos_token_id=[2, 73440])


def tiny() -> ModelConfig:
    """A MiniCPM4-shaped toy (GQA group 4, muP multipliers != 1) that runs in milliseconds."""
    return ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                       scale_emb=12, scale_depth=1.4, dim_model_base=32, tie_word_embeddings=False,
                       eos_token_id=[2])


PRESETS = {"minicpm4-0.5b": minicpm4_0_5b, "minicpm4-8b": minicpm4_8b, "tiny": tiny}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()
