"""Read a llama.cpp GGUF file into a Hugging Face-style checkpoint: config dict, state dict, tokenizer.

GGUF keeps everything in one file: hyper-parameters and the tokenizer as metadata under llama.cpp key
names, and the weights as (often quantized) tensors under llama.cpp tensor names. `read_gguf` maps
all three back to what a Hugging Face checkpoint directory would hold, so the rest of the package only
ever sees one format.

Key choices:
- Parsing and dequantization use the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`), which
  works on whole numpy arrays; nothing here loops over elements in Python.
- llama.cpp's converter permutes the q/k projection rows of llama-family models (its RoPE pairs
  adjacent dimensions, HF's pairs the two halves of each head); we undo that permutation here.
- Only the `llama` and `minicpm` architectures are accepted, and any tensor we do not know raises
  instead of being dropped, so an unsupported variant fails loudly rather than running wrong.
- The tokenizer mirrors what transformers builds from the same metadata (see `tokenizer_from_gguf`).
- Every failure becomes a `CheckpointError` naming the file; no gguf/numpy traceback escapes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import tokenizers
import torch
from tqdm import tqdm

from minicpm4.errors import CheckpointError
from minicpm4.quant.gguf_blocks import KEPT_TYPES
from minicpm4.text.tokenizer import (SPECIAL_TOKEN_KEYS, Tokenizer, add_vocab_special_tokens, byte_level_bpe,
                                     sentencepiece_bpe)

SUPPORTED_ARCHITECTURES = ("llama", "minicpm")

# The one gguf -> HF name table. `{i}` is the layer index. Rope factor tensors are not weights: they
# become `config["rope_scaling"]` instead (see _ROPE_FACTOR_TENSORS).
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")

# HF config field <- GGUF key (prefixed with "{arch}."); these must be present.
_REQUIRED_CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "max_position_embeddings": "context_length",
}
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "minicpm": "MiniCPMForCausalLM"}


@dataclass
class GGUFCheckpoint:
    """What a HF checkpoint directory holds, rebuilt from one GGUF file."""

    config: dict[str, Any]  # config.json-style
    state_dict: dict[str, torch.Tensor]  # HF parameter names, [out_features, in_features] matrices
    tokenizer: tokenizers.Tokenizer
    tokenizer_config: dict[str, Any]  # tokenizer_config.json-style
    # with keep_quantized: (GGML type, raw blocks [out_features, bytes per row]) of each layer linear weight whose
    # type is in quant/gguf_blocks.KEPT_TYPES (Q4_0, Q4_1, Q8_0), under the HF module name (e.g.
    # "model.layers.0.self_attn.q_proj"), instead of a float tensor in state_dict
    quantized: dict[str, tuple[int, np.ndarray]] = dataclasses.field(default_factory=dict)

    def text_tokenizer(self) -> Tokenizer:
        """The tokenizer (encode, decode, chat template) this file describes."""
        return Tokenizer(self.tokenizer, self.tokenizer_config)


def read_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
              keep_quantized: bool = False) -> GGUFCheckpoint:
    """Parse `path` and dequantize every weight to `dtype`; raises CheckpointError on any problem.

    keep_quantized: leave Q4_0 / Q4_1 / Q8_0 layer weights as raw blocks (GGUFCheckpoint.quantized) for
    gguf_quant.gguf_linear.
    """
    name = os.fspath(path)
    reader = _open_reader(name)
    try:
        metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except (ValueError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{name}: corrupt GGUF metadata ({exc})") from None
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise CheckpointError(f"{name}: GGUF architecture {arch!r} is not supported (supported: {supported})")
    config = _config_from_metadata(name, arch, metadata)
    state_dict, rope_factors, quantized = _read_tensors(name, reader, config, dtype, keep_quantized)
    config["tie_word_embeddings"] = "lm_head.weight" not in state_dict
    config.setdefault("vocab_size", int(state_dict["model.embed_tokens.weight"].shape[0]))
    if rope_factors:
        config["rope_scaling"] = _longrope_scaling(name, arch, metadata, config, rope_factors)
    tokenizer, tokenizer_config = _tokenizer_from_metadata(name, metadata)
    return GGUFCheckpoint(config, state_dict, tokenizer, tokenizer_config, quantized)


def _open_reader(name: str) -> gguf.GGUFReader:
    """GGUFReader over `name`, with the checks whose raw errors would not say what is wrong."""
    try:
        with open(name, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot open file ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{name}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return gguf.GGUFReader(name)
    except (ValueError, IndexError, KeyError, OSError) as exc:
        # A truncated file shows up as a tensor whose bytes run past the end ("cannot reshape ...").
        raise CheckpointError(f"{name}: truncated or corrupt GGUF file ({exc})") from None


def _config_from_metadata(name: str, arch: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """HF config.json fields from the `{arch}.*` hyper-parameters and the tokenizer's special ids."""

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    # llama.cpp's llama and minicpm graphs always use SiLU-gated MLPs and no attention biases.
    config: dict[str, Any] = {"model_type": arch, "architectures": [_HF_ARCHITECTURES[arch]], "hidden_act": "silu"}
    for field, key in _REQUIRED_CONFIG_KEYS.items():
        value = get(key)
        if not isinstance(value, int):  # a per-layer list (other archs) or absent
            raise CheckpointError(f"{name}: metadata key '{arch}.{key}' is missing or not a single integer")
        config[field] = value
    config["num_key_value_heads"] = get("attention.head_count_kv", config["num_attention_heads"])
    head_dim = get("attention.key_length", get("rope.dimension_count"))
    if head_dim is not None:
        config["head_dim"] = head_dim
    config["rope_theta"] = _f32(get("rope.freq_base", 10000.0))
    config["rms_norm_eps"] = _f32(get("attention.layer_norm_rms_epsilon", 1e-5))
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "longrope"):
        raise CheckpointError(f"{name}: RoPE scaling type {scaling!r} is not supported (supported: none, longrope)")
    if get("vocab_size") is not None:  # older files omit it: read_gguf then counts the embedding rows
        config["vocab_size"] = get("vocab_size")
    for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in metadata:
            config[field] = metadata[f"tokenizer.ggml.{key}"]
    if arch == "minicpm":
        config.update(_minicpm_scales(name, arch, metadata, config))
    return config


def _minicpm_scales(name: str, arch: str, metadata: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Undo llama.cpp's MiniCPM conversion: it stores embedding_scale = scale_emb,
    residual_scale = scale_depth / sqrt(num_layers) and logit_scale = hidden_size / dim_model_base."""
    keys = gguf.Keys.LLM
    values = {}
    for key in (keys.EMBEDDING_SCALE, keys.RESIDUAL_SCALE, keys.LOGIT_SCALE):
        full = key.format(arch=arch)
        if not isinstance(metadata.get(full), (int, float)) or metadata[full] == 0:
            raise CheckpointError(f"{name}: metadata key '{full}' is missing or zero")
        values[key] = float(metadata[full])
    dim_model_base = config["hidden_size"] / values[keys.LOGIT_SCALE]
    return {
        "scale_emb": _f32(values[keys.EMBEDDING_SCALE]),
        "scale_depth": _round7(values[keys.RESIDUAL_SCALE] * math.sqrt(config["num_hidden_layers"])),
        # dim_model_base is an integer width in every MiniCPM config; keep it one when it rounds cleanly.
        "dim_model_base": round(dim_model_base) if abs(dim_model_base - round(dim_model_base)) < 1e-3
        else _round7(dim_model_base),
    }


def _longrope_scaling(name: str, arch: str, metadata: dict[str, Any], config: dict[str, Any],
                      factors: dict[str, list[float]]) -> dict[str, Any]:
    """HF `rope_scaling` for the per-dimension factors llama.cpp stores as rope_factors_* tensors."""
    if set(factors) != {"long_factor", "short_factor"}:
        raise CheckpointError(f"{name}: has only one of the rope_factors_long/rope_factors_short tensors")
    original = metadata.get(f"{arch}.rope.scaling.original_context_length", config["max_position_embeddings"])
    return {"rope_type": "longrope", "original_max_position_embeddings": original, **factors}


def _read_tensors(name: str, reader: gguf.GGUFReader, config: dict[str, Any], dtype: torch.dtype,
                  keep_quantized: bool) -> tuple[dict[str, torch.Tensor], dict[str, list[float]], dict]:
    """Dequantized weights under HF names, the rope factor lists (config, not weights), and raw quantized layer
    weights (type, blocks)."""
    state_dict: dict[str, torch.Tensor] = {}
    rope_factors: dict[str, list[float]] = {}
    quantized: dict[str, tuple[int, np.ndarray]] = {}
    for tensor in tqdm(reader.tensors, desc=f"reading {os.path.basename(name)}", unit="tensor", disable=None, leave=False):
        hf_name = None if tensor.name in _ROPE_FACTOR_TENSORS else _hf_name(name, tensor.name)
        raw = keep_quantized and tensor.tensor_type in KEPT_TYPES and \
            hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight")
        # rows are whole blocks in the raw types, so the q/k row permutation below applies to the bytes as well
        array = np.array(tensor.data) if raw else _dequantize(name, tensor)
        if tensor.name in _ROPE_FACTOR_TENSORS:
            rope_factors[_ROPE_FACTOR_TENSORS[tensor.name]] = [_f32(x) for x in array.reshape(-1).tolist()]
            continue
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            n_head = config["num_attention_heads" if "q_proj" in hf_name else "num_key_value_heads"]
            if array.ndim != 2 or array.shape[0] % (2 * n_head):
                raise CheckpointError(f"{name}: tensor {tensor.name!r} of shape {list(array.shape)} does not "
                                      f"split into {n_head} heads")
            array = _unpermute_rope_rows(array, n_head)
        if raw:
            quantized[hf_name.removesuffix(".weight")] = (int(tensor.tensor_type), array)
        else:
            state_dict[hf_name] = torch.from_numpy(array).to(dtype)
    if "model.embed_tokens.weight" not in state_dict:
        raise CheckpointError(f"{name}: has no token_embd.weight tensor")
    return state_dict, rope_factors, quantized


def _hf_name(name: str, gguf_name: str) -> str:
    """HF parameter name for a GGUF tensor name, through `_TENSOR_NAMES`."""
    match = _LAYER_NAME.fullmatch(gguf_name)
    key = f"blk.{{i}}.{match.group(2)}" if match else gguf_name
    if key not in _TENSOR_NAMES:
        raise CheckpointError(f"{name}: unexpected tensor {gguf_name!r} (this model variant is not supported)")
    return _TENSOR_NAMES[key].format(i=match.group(1) if match else "")


def _dequantize(name: str, tensor: Any) -> np.ndarray:
    """float32 array of the tensor in numpy order: [out_features, in_features] for a matrix.

    GGUF lists dims fastest-first (ne0 = in_features); the reader and `dequantize` already return the
    reversed, row-major shape that HF uses.
    """
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(
            f"{name}: tensor {tensor.name!r} uses quantization type {tensor.tensor_type.name}, which is not supported"
        ) from None
    # F32 tensors come back as a read-only view of the memory map; copy so torch owns writable memory
    # and the file can be closed.
    return array if array.flags.writeable else array.copy()


def _unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    The converter turned each head's rows from HF layout [2, head_dim/2] (two halves) into
    [head_dim/2, 2] (interleaved pairs): w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2). We apply the
    inverse, reshape(n_head, hd/2, 2, in).swapaxes(1, 2), on the [n_head * head_dim, in] matrix.
    """
    rows, cols = weight.shape
    return weight.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tokenizer_from_metadata(name: str, metadata: dict[str, Any]) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """Backend and tokenizer_config from the `tokenizer.*` metadata, built as transformers builds them."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
    types = metadata.get("tokenizer.ggml.token_type") or []
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens:
        raise CheckpointError(f"{name}: has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    config: dict[str, Any] = {"add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                              "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False))}
    for key, id_key in zip(SPECIAL_TOKEN_KEYS, ("bos", "eos", "unknown", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{id_key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise CheckpointError(f"{name}: tokenizer.ggml.{id_key}_token_id {token_id} is outside the vocabulary")
        config[key] = tokens[token_id] if token_id is not None else None
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    scores = metadata.get("tokenizer.ggml.scores")
    if kind not in ("gpt2", "llama"):
        raise CheckpointError(f"{name}: tokenizer type {kind!r} is not supported (supported: gpt2, llama)")
    if merges is None and (kind == "gpt2" or scores is None):
        raise CheckpointError(f"{name}: {kind!r} tokenizer has no tokenizer.ggml.merges (nor scores to rebuild them)")
    try:
        if kind == "gpt2":
            backend = byte_level_bpe(tokens, merges, metadata.get("tokenizer.ggml.pre"))
        else:
            add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            backend = sentencepiece_bpe(tokens, scores or [], merges, add_prefix)
        add_vocab_special_tokens(backend, tokens, types, [config[key] for key in SPECIAL_TOKEN_KEYS])
    except Exception as exc:  # `tokenizers` raises plain Exception, e.g. for a merge of unknown tokens
        raise CheckpointError(f"{name}: inconsistent tokenizer metadata ({exc})") from None
    return backend, config


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _round7(value: float) -> float:
    """A value derived from float32 metadata, rounded to the ~7 significant digits float32 carries."""
    return float(f"{value:.7g}")
