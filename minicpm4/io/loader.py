"""`load(source)` -> (model, tokenizer) from an HF directory, a GGUF file or a Hub id; `save_pretrained`.

Sources, tried in this order:
  None / "default"      the offline default model (io/default_model.py), converted once into the cache
  a *.gguf file         read with the gguf package, dequantized to `dtype`, tokenizer rebuilt from metadata
  a directory           config.json + model.safetensors (or a sharded index) + tokenizer files
  "org/name"            downloaded with huggingface_hub (the `hub` extra), then read as a directory

The model is built on the meta device and the checkpoint tensors are assigned to it, so loading costs
one read of the weights and no random initialisation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from minicpm4.config import ModelConfig
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.io.default_model import converted_dir, default_gguf_path
from minicpm4.io.gguf import read_gguf
from minicpm4.model.decoder import MiniCPM4ForCausalLM, RotaryEmbedding
from minicpm4.quant.gguf_blocks import gguf_linear
from minicpm4.quant.gptq_format import gptq_layers, quant_config_of
from minicpm4.quant.int4 import Int4Linear
from minicpm4.quant.int8 import Int8Linear
from minicpm4.quant.ternary import TernaryLinear
from minicpm4.quant.ternary_format import is_ternary, ternary_layers
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.weights import checkpoint_files, load_into, read_state_dict, write_hf_dir

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def auto_dtype(compact_weights: bool = False, device: str = "cpu") -> torch.dtype:
    """What dtype "auto" means here. bf16 where bf16 products are native (kernels.isa.native_bf16: avx512_bf16 /
    AMX, Arm BF16) or off the CPU. Elsewhere a bf16 matmul is emulated and several times slower than fp32, so
    plain float models run in fp32; models whose linear layers stay int4 / int8 / ternary (compact_weights) keep
    bf16 activations, because our kernels turn them into int8 or fp32 inside and never run a bf16 product: bf16
    storage halves the activation traffic and is the model's reference numerics (model/decoder.py)."""
    if not str(device).startswith("cpu") or compact_weights:
        return torch.bfloat16
    from minicpm4.kernels import isa
    return torch.bfloat16 if isa.native_bf16() else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str = "cpu", compact_weights: bool = False) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return auto_dtype(compact_weights, device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r} (use one of: {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    if dtype == torch.float16 and str(device).startswith("cpu"):
        # fp16 matmul takes a scalar path on these CPUs (~0.3 GFLOP/s vs ~900 for bf16)
        raise ConfigError("float16 on CPU is extremely slow in PyTorch; use bfloat16 (same memory) or float32")
    return dtype


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], source: str,
                gguf_raw: dict | None = None, layers: dict | None = None) -> MiniCPM4ForCausalLM:
    """Instantiate without initialising weights, then assign the checkpoint tensors.

    gguf_raw: raw GGUF (type, blocks) weights by module name (gguf_file.GGUFCheckpoint.quantized); those nn.Linear
    modules become Int4Linear (Q4_0, Q4_1) or Int8Linear (Q8_0), and a float lm_head becomes Int8Linear (per-row
    int8, requantized from the checkpoint's weights).
    layers: ready quantized modules (Int4Linear / Int8Linear / TernaryLinear) by name, put in place of those nn.Linear.
    """
    with torch.device("meta"):
        model = MiniCPM4ForCausalLM(config)
    state = dict(state)
    layers = {**(layers or {}), **{name: gguf_linear(*kr) for name, kr in (gguf_raw or {}).items()}}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        try:
            expected = tuple(model.get_submodule(name).weight.shape)
        except AttributeError:
            raise CheckpointError(f"{source}: unexpected quantized tensor {name}.qweight for this config") from None
        if layer.weight_shape != expected:
            raise CheckpointError(f"{source}: tensor {name}.weight has shape {layer.weight_shape}, "
                                  f"config implies {expected}")
        setattr(model.get_submodule(parent), child, layer)
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    load_into(model, state, source)
    model.model.rotary_emb = RotaryEmbedding(config)  # its buffers were created on meta; rebuild them
    if gguf_raw and isinstance(model.lm_head, torch.nn.Linear):
        # the head (vocab x hidden) is the largest matmul of a decode step; int8 rows halve what it reads
        model.lm_head = Int8Linear.from_float(model.lm_head.weight)
    return model.eval()


def load(source: str | os.PathLike | None = None, dtype: str | torch.dtype | None = "auto",
         config_overrides: dict | None = None, int4: bool = False) -> tuple[MiniCPM4ForCausalLM, Tokenizer]:
    """Load a model and its tokenizer. config_overrides: HF config keys to change (e.g. sparse_config).

    int4: keep a GGUF's quantized layer weights quantized instead of dequantizing them: Q4_0 / Q4_1 as Int4Linear,
    Q8_0 as Int8Linear (bf16 activations); see quant/gguf_blocks.py.
    """
    if dtype not in (None, "auto"):
        resolve_dtype(dtype)  # an unknown or CPU-hostile dtype is refused before any file is read
    if source is None or str(source) == "default":
        source = default_gguf_path() if int4 else default_model_dir()
    path = Path(source)
    if path.suffix == ".gguf" or path.is_file():
        return _load_gguf(path, resolve_dtype(dtype, compact_weights=int4), config_overrides, int4)
    if int4:
        raise ConfigError(f"{source}: int4 loading reads Q4_1 weights from a GGUF file; this is not one")
    if path.is_dir():
        return _load_dir(path, dtype, config_overrides)
    if _looks_like_repo_id(str(source)):
        return _load_dir(_download(str(source)), dtype, config_overrides)
    raise CheckpointError(f"{source}: no such file or directory")


def _load_dir(path: Path, dtype: str | torch.dtype | None, overrides: dict | None):
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: config.json not found (is this a Hugging Face model directory?)")
    config = ModelConfig.from_json(cfg_path)
    if overrides:
        config = ModelConfig.from_dict(merge_overrides(config.to_dict(), overrides))
    qc = quant_config_of(path, config.extra)
    dtype = resolve_dtype(dtype, compact_weights=qc is not None)
    state = read_state_dict(checkpoint_files(path), dtype)
    layers = ternary_layers(qc, state, str(path)) if is_ternary(qc) else gptq_layers(qc, state, str(path))
    model = build_model(config, state, str(path), layers=layers)
    return model, Tokenizer.from_dir(path)


def _load_gguf(path: Path, dtype: torch.dtype, overrides: dict | None, int4: bool = False):
    ckpt = read_gguf(path, dtype=dtype, keep_quantized=int4)
    try:
        config = ModelConfig.from_dict(merge_overrides(ckpt.config, overrides or {}))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = build_model(config, ckpt.state_dict, str(path), ckpt.quantized)
    return model, ckpt.text_tokenizer()


def merge_overrides(config: dict, overrides: dict) -> dict:
    """config.json keys replaced by overrides; a sparse_config dict is merged field by field (None removes it)."""
    merged = {**config, **overrides}
    sparse = overrides.get("sparse_config")
    if isinstance(sparse, dict) and isinstance(config.get("sparse_config"), dict):
        merged["sparse_config"] = {**config["sparse_config"], **sparse}
    return merged


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: not a local path; to download from the Hugging Face Hub "
                              "install the hub extra: pip install 'minicpm4[hub]'") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network down, repo missing, gated: one clear line either way
        raise CheckpointError(f"{repo_id}: could not download from the Hugging Face Hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "check the id and the network, or pass a local directory or .gguf file") from None


def save_pretrained(model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write an HF-format directory (config.json, model.safetensors, tokenizer files).

    Everything is written into a temporary sibling directory that is renamed into place at the end, so
    an interrupted write never leaves a half-converted model behind.
    """
    out = Path(out_dir)
    if model.fused or any(isinstance(m, (Int4Linear, Int8Linear, TernaryLinear)) for m in model.modules()):
        raise ConfigError("save_pretrained writes float HF weights; this model has fused or quantized layers "
                          "(fuse_projections, int4): load the checkpoint again without them to convert it")
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return write_hf_dir(out, cfg, model.state_dict(), tokenizer, model.config.tie_word_embeddings)


def default_model_dir() -> Path:
    """The default model as an HF directory (fp32 safetensors + tokenizer), converted once from the GGUF."""
    out = converted_dir()
    if (out / "config.json").is_file():
        return out
    gguf = default_gguf_path()
    print(f"minicpm4: converting {gguf.name} into {out} (once)", file=sys.stderr)
    model, tokenizer = load(gguf, dtype="fp32")
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    save_pretrained(model, tokenizer, out)
    return out
