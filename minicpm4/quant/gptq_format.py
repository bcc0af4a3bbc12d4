"""Quantized checkpoints in the GPTQ safetensors layout (AutoGPTQ / GPTQModel, `checkpoint_format: "gptq"`).

Per quantized linear `<name>` with weight W [N, K] (N outputs, K inputs), `bits` b, pack = 32 / b, group g:

    <name>.qweight  int32 [K/pack, N]   unsigned codes u[n, k] in 0..2^b-1; word [i, n] holds u[n, i*pack + j]
                                        in bits b*j .. b*j+b-1 (j = 0 first, i.e. little-endian nibbles/bytes)
    <name>.qzeros   int32 [K/g, N/pack] zero points packed the same way along N; the classic v1 "gptq" format
                                        stores z - 1 (so a symmetric 4-bit zero 8 is stored as 7); "gptq_v2"
                                        (GPTQModel's internal format) stores z itself. Both are read.
    <name>.scales   fp16  [K/g, N]
    <name>.g_idx    int32 [K]           group of each input column: k // g, or with act-order (desc_act: true)
                                        the group of the column's position in the quantization order
    <name>.bias     fp16  [N]           only where the float layer had a bias
    W[n, k] = (u[n, k] - z[g_idx[k], n]) * scales[g_idx[k], n]

config.json carries quantization_config = {"quant_method": "gptq", "bits", "group_size" (-1: one group per
row), "desc_act", "sym", "checkpoint_format": "gptq"}. We write v1 ("gptq") with desc_act false. Symmetric codes
c (|c| <= 2^(b-1)-1) are written as u = c + 2^(b-1) with z = 2^(b-1), the symmetric zero GPTQ uses. 8 bits is
written per output channel (group_size -1). Other tensors (embeddings, norms, an untied lm_head) are bf16.

Reading turns every quantized linear into an Int4Linear (bits <= 4) or an Int8Linear (8 bits, symmetric, per
channel); nothing is dequantized to float. A g_idx other than k // g (act-order) is read by sorting the input
columns by group: the layer then holds W[:, perm] (contiguous groups again) and gathers x[..., perm] before its
product; that layer and a bias go into a `GPTQAdapter`, which the C++ decode stack does not run (such models
decode on the Python layers). desc_act: true with a plain g_idx (static groups) needs no adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.quant.primitives import QTensor, to_int4_linear, to_int8_linear
from minicpm4.weights import write_hf_dir

FORMATS = ("gptq", "gptq_v2")


def pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [R, C] (R divisible by 32/bits) -> int32 [R*bits/32, C], value j of a word at bits*j."""
    pack = 32 // bits
    r, c = u.shape
    v = u.to(torch.int64).reshape(r // pack, pack, c)
    word = torch.zeros(r // pack, c, dtype=torch.int64)
    for j in range(pack):
        word |= v[:, j] << (bits * j)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)  # the same 32 bits, signed


def unpack_rows(word: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [R', C] -> int64 [R' * 32/bits, C]."""
    pack = 32 // bits
    w = word.to(torch.int64) & 0xFFFFFFFF
    vals = torch.stack([(w >> (bits * j)) & (2 ** bits - 1) for j in range(pack)], dim=1)
    return vals.reshape(-1, word.shape[1])


def pack_qtensor(q: QTensor) -> dict[str, torch.Tensor]:
    """A QTensor's qweight / qzeros (v1: z - 1) / scales / g_idx."""
    n, k = q.shape
    if 32 % q.bits:
        raise ValueError(f"the GPTQ layout packs 2, 4 or 8 bits here, got {q.bits}")
    mid = 2 ** (q.bits - 1)
    u = q.codes.int() + mid if q.symmetric else q.codes.int()
    z = torch.full(q.scales.shape, mid, dtype=torch.int32) if q.symmetric else q.zeros.int()  # [N, G]
    return {"qweight": pack_rows(u.T.contiguous(), q.bits),
            "qzeros": pack_rows((z - 1) & (2 ** q.bits - 1), q.bits).T.contiguous(),  # v1: z - 1, wrapping
            "scales": q.scales.T.contiguous().to(torch.float16),
            "g_idx": (torch.arange(k) // q.group_size).to(torch.int32)}


class GPTQAdapter(nn.Module):
    """y = inner(x[..., perm]) + bias: an act-order GPTQ layer (perm sorts the input columns by group) and/or a
    bias, around an Int4Linear / Int8Linear. Either part may be None."""

    def __init__(self, inner: nn.Module, perm: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.inner = inner
        self.register_buffer("perm", perm)
        self.register_buffer("bias", bias)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.inner.weight_shape

    @classmethod
    def cat(cls, layers: list["GPTQAdapter"]) -> "GPTQAdapter":
        """Side by side outputs (model.cat_linears), when all layers gather their input the same way."""
        perms = [m.perm for m in layers]
        if any((p is None) != (perms[0] is None) or (p is not None and not torch.equal(p, perms[0])) for p in perms):
            raise ValueError("act-order layers with different input orders cannot share one product")
        biases = [m.bias if m.bias is not None else torch.zeros(m.weight_shape[0]) for m in layers]
        has_bias = any(m.bias is not None for m in layers)
        inner = type(layers[0].inner).cat([m.inner for m in layers])
        return cls(inner, perms[0], torch.cat([b.to(torch.bfloat16) for b in biases]) if has_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x if self.perm is None else x.index_select(-1, self.perm))
        return y if self.bias is None else y + self.bias.to(y.dtype)


def act_order_perm(name: str, g_idx: torch.Tensor, k: int, g: int, source: str) -> torch.Tensor | None:
    """None for g_idx = k // g; else the column order that makes every group contiguous (each group must hold g
    columns, as GPTQ's act-order assigns them)."""
    g_idx = g_idx.long().flatten()
    if torch.equal(g_idx, torch.arange(k) // g):
        return None
    if g_idx.numel() != k or bool((g_idx < 0).any()) or bool((g_idx >= k // g).any()) or \
            not bool((torch.bincount(g_idx, minlength=k // g) == g).all()):
        raise CheckpointError(f"{source}: tensor {name}.g_idx is not a grouping of {k} columns into groups of {g}")
    return torch.argsort(g_idx, stable=True)


def unpack_qtensor(name: str, t: dict[str, torch.Tensor], bits: int, group_size: int, fmt: str,
                   source: str) -> QTensor:
    """The QTensor of `name` from its GPTQ tensors, with input columns in g_idx order (see act_order_perm); a
    missing or contradicting tensor -> CheckpointError."""
    for part in ("qweight", "qzeros", "scales"):
        if part not in t:
            raise CheckpointError(f"{source}: tensor {name}.{part} missing from the GPTQ checkpoint")
    pack = 32 // bits
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise CheckpointError(f"{source}: tensor {name}.qweight must be int32 [K/{pack}, N], "
                              f"got {qweight.dtype} {tuple(qweight.shape)}")
    k, n = qweight.shape[0] * pack, qweight.shape[1]
    g = k if group_size == -1 else group_size
    if k % g or n % pack:
        raise CheckpointError(f"{source}: tensor {name}.qweight has shape {tuple(qweight.shape)}: K = {k} "
                              f"(N = {n}) contradicts group_size {group_size} / {bits}-bit packing")
    if tuple(scales.shape) != (k // g, n):
        raise CheckpointError(f"{source}: tensor {name}.scales has shape {tuple(scales.shape)}, qweight and "
                              f"group_size {group_size} imply {(k // g, n)}")
    if tuple(qzeros.shape) != (k // g, n // pack) or qzeros.dtype != torch.int32:
        raise CheckpointError(f"{source}: tensor {name}.qzeros has shape {tuple(qzeros.shape)} "
                              f"({qzeros.dtype}), qweight and group_size {group_size} imply int32 {(k // g, n // pack)}")
    perm = None if t.get("g_idx") is None else act_order_perm(name, t["g_idx"], k, g, source)
    u = unpack_rows(qweight, bits).T.contiguous()  # [N, K]
    if perm is not None:
        u = u[:, perm].contiguous()  # column perm[j] moves to j: group j // g is contiguous
    z = unpack_rows(qzeros.T.contiguous(), bits)  # [N, G]
    z = (z + 1) & (2 ** bits - 1) if fmt == "gptq" else z  # v1 stores z - 1 (a zero of 0 wraps to 2^b - 1)
    scales = scales.float().T.contiguous()  # [N, G]
    mid = 2 ** (bits - 1)
    if bool((z == mid).all()):
        return QTensor((u - mid).to(torch.int16), scales, None, bits, g, True)
    return QTensor(u.to(torch.int16), scales, z.to(torch.int16), bits, g, False)


def quant_config_of(directory: Path, config_extra: dict) -> dict | None:
    """config.json's quantization_config, else the quantize_config.json older AutoGPTQ releases keep beside it
    (no quant_method there: it is GPTQ), else None."""
    if "quantization_config" in config_extra:
        return config_extra["quantization_config"]
    path = Path(directory) / "quantize_config.json"
    if not path.is_file():
        return None
    try:
        qc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    return {"quant_method": "gptq", **qc} if isinstance(qc, dict) else qc


def gptq_layers(quant_config: dict | None, state: dict[str, torch.Tensor], source: str) -> dict:
    """For a config.json quantization_config with quant_method "gptq": pop every `<name>.qweight/qzeros/scales/
    g_idx` from `state` and return {name: Int4Linear or Int8Linear}. Other configs: {} (state untouched)."""
    if not isinstance(quant_config, dict) or quant_config.get("quant_method") != "gptq":
        if isinstance(quant_config, dict):
            raise CheckpointError(f"{source}: quant_method {quant_config.get('quant_method')!r} is not "
                                  "supported (supported: gptq, minicpm4_ternary)")
        return {}
    bits, group_size = quant_config.get("bits"), quant_config.get("group_size", -1)
    # "checkpoint_format" in JSON (AutoGPTQ >= 0.7, GPTQModel); some writers used "format"; marlin repacks
    fmt = quant_config.get("checkpoint_format", quant_config.get("format", "gptq"))
    if quant_config.get("is_marlin_format"):
        fmt = "marlin"
    if bits not in (2, 4, 8) or not isinstance(group_size, int) or fmt not in FORMATS:
        raise CheckpointError(f"{source}: unsupported GPTQ config bits={bits} group_size={group_size} "
                              f"checkpoint_format={fmt!r} (supported: bits 4 or 8, formats {FORMATS})")
    names = sorted({k.rpartition(".")[0] for k in state if k.endswith((".qweight", ".qzeros", ".scales"))})
    layers = {}
    for name in names:
        parts = {p: state.pop(f"{name}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx", "bias")
                 if f"{name}.{p}" in state}
        q = unpack_qtensor(name, parts, bits, group_size, fmt, source)
        try:
            layer = to_int8_linear(q) if bits == 8 else to_int4_linear(q)
        except ValueError as e:
            raise CheckpointError(f"{source}: tensor {name}.qweight: {e}") from None
        k = q.shape[1]
        perm = None if "g_idx" not in parts else act_order_perm(name, parts["g_idx"], k, q.group_size, source)
        bias = parts.get("bias")
        if bias is not None and tuple(bias.shape) != (q.shape[0],):
            raise CheckpointError(f"{source}: tensor {name}.bias has shape {tuple(bias.shape)}, expected {(q.shape[0],)}")
        if perm is not None or bias is not None:
            layer = GPTQAdapter(layer, perm, None if bias is None else bias.to(torch.bfloat16))
        layers[name] = layer
    return layers


def save_quantized(model, qtensors: dict[str, QTensor], tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write a GPTQ-layout directory: config.json with quantization_config, model.safetensors, tokenizer files.
    All qtensors share bits, symmetry and group size (8 bits: per channel). Written into a temporary sibling
    directory renamed into place at the end."""
    out = Path(out_dir)
    kinds = {(q.bits, q.symmetric, -1 if q.group_size == q.shape[1] and q.bits == 8 else q.group_size)
             for q in qtensors.values()}
    if len(kinds) != 1:
        raise ConfigError(f"save_quantized needs one bits / symmetry / group size for all layers, got {kinds}")
    (bits, sym, group_size), = kinds
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(".weight") and k[:-len(".weight")] in qtensors:
            continue
        state[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
    for name, q in qtensors.items():
        state.update({f"{name}.{p}": v for p, v in pack_qtensor(q).items()})
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                  "desc_act": False, "sym": sym, "checkpoint_format": "gptq"}
    return write_hf_dir(out, cfg, state, tokenizer, model.config.tie_word_embeddings)


def calibration_batches(tokenizer, text: str, seq_len: int, nsamples: int, batch: int = 4) -> list[torch.Tensor]:
    """Token id batches [B, seq_len] from `text`: consecutive chunks of seq_len - 1 tokens, each after a BOS,
    at most nsamples sequences (a text shorter than one sequence gives one shorter sequence)."""
    ids = tokenizer.encode(text)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = seq_len - len(bos)
    if not ids:
        raise ConfigError("the calibration text has no tokens")
    seqs = [bos + ids[i:i + step] for i in range(0, max(len(ids) - step + 1, 1), step)][:nsamples]
    seqs = [s for s in seqs if len(s) == len(seqs[0])]
    return [torch.tensor(seqs[i:i + batch]) for i in range(0, len(seqs), batch)]
