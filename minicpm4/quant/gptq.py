"""Calibrated weight quantization: GPTQ (Frantar et al. 2022) and P-GPTQ (MiniCPM4 tech report, sec. 4.1.2).

For a linear layer y = x W^T with calibration inputs X [n, K], GPTQ picks W_q minimizing the output error
||X W^T - X W_q^T||^2 = sum over rows w of (w - w_q) H (w - w_q)^T / 2, with the Hessian H = 2/n X^T X [K, K].
It quantizes one column k at a time and spreads the rounding error onto the columns not yet quantized,
    err = (w_k - q_k) / U_kk,    W[:, k:] -= err U[k, k:],    U = upper Cholesky factor of H^-1,
which is the optimal update of the remaining columns (Optimal Brain Quantization) done in K steps.

P-GPTQ is GPTQ with the first `skip_prefix` (s = 4) positions of each calibration sequence left out of H: BOS
and the first tokens carry activations far larger than the rest in some layers, dominate X^T X, and would make
GPTQ fit those few positions at the expense of every other one. (On the default SmolLM2 model this backfires:
the input of layer 11's down-projection at BOS is ~460x the median position's, the attention sink that every
later token reads; weights fit without it corrupt the sink. See BENCHMARKS.md, "Why P-GPTQ loses here".)

`calibrate` is one pass of the float model: every layer is fitted to float inputs. `quantize_sequential` is
the GPTQ paper's order instead: decoder layer l is calibrated on the outputs of the already quantized layers
before it (about L/2 forward passes of the calibration set for L layers).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from minicpm4.quant.primitives import QTensor, dequantize, group_params, quantize_codes, quantize_int

METHODS = ("rtn", "gptq", "pgptq")


class HessianAccumulator:
    """Running H = 2/n * sum x^T x over a layer's inputs, in fp64, leaving out the first `skip_prefix`
    positions of every sequence (P-GPTQ; skip_prefix = 0 is plain GPTQ). The left-out positions are summed
    apart, so `hessian(include_prefix=True)` still gives the plain GPTQ Hessian from the same pass."""

    def __init__(self, in_features: int, skip_prefix: int = 0):
        self.in_features, self.skip_prefix = in_features, skip_prefix
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)  # positions >= skip_prefix
        self.xtx_prefix = torch.zeros(in_features, in_features, dtype=torch.float64)  # positions < skip_prefix
        self.n = self.n_prefix = 0

    def add(self, x: torch.Tensor) -> None:
        """x [B, T, K] (or [T, K], one sequence): the layer's inputs, position 0 first."""
        x = x.detach().reshape(-1, *x.shape[-2:]).double()
        rest = x[:, self.skip_prefix:].reshape(-1, self.in_features)
        head = x[:, :self.skip_prefix].reshape(-1, self.in_features)
        self.xtx += rest.T @ rest
        self.n += rest.shape[0]
        if head.shape[0]:
            self.xtx_prefix += head.T @ head
            self.n_prefix += head.shape[0]

    def hessian(self, include_prefix: bool = False) -> torch.Tensor:
        """H [K, K] fp64 (zero before any input)."""
        xtx, n = (self.xtx + self.xtx_prefix, self.n + self.n_prefix) if include_prefix else (self.xtx, self.n)
        return xtx * (2 / max(n, 1))

    @property
    def H(self) -> torch.Tensor:
        return self.hessian()


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> QTensor:
    """GPTQ of w [N, K] against the Hessian H [K, K], as in the GPTQ paper's Algorithm 1 (lazy batched updates
    in blocks, Cholesky form of H^-1, damping lambda = damp * mean(diag H)).

    Columns go in order by default, and each group's scale and zero come from the weights as updated by the
    error feedback so far, at the group's first column. act_order (AutoGPTQ's desc_act with static_groups):
    columns go in order of decreasing H_kk (the inputs with the most energy first, while the most columns are
    left to absorb their error), and group scales are fixed beforehand from the original weights, so group g
    still holds columns g*group_size.. and the checkpoint needs no g_idx permutation."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input dimension {k} is not divisible by group size {group_size}")
    # whole groups per block, so a group's columns are all in the block being updated when its scale is set
    block_size = max(block_size // group_size, 1) * group_size
    W = w.detach().double().clone()
    H = H.detach().double().clone()
    dead = H.diagonal() == 0  # inputs never active: their weights cannot matter, quantize them as zero
    H[dead, dead] = 1
    W[:, dead] = 0
    col_params = None
    perm = torch.arange(k)
    if act_order:
        scale, zero = group_params(W.view(n, k // group_size, group_size), bits, symmetric)  # [N, G] each
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        gcol = perm // group_size  # group of each column in processing order
        col_params = (scale[:, gcol], None if zero is None else zero[:, gcol])  # [N, K] in processing order
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # chol(H^-1), upper

    codes = torch.zeros(n, k, dtype=torch.int16)  # in processing order, un-permuted at the end
    scales = torch.zeros(n, k // group_size, dtype=torch.float64)
    zeros = None if symmetric else torch.zeros(n, k // group_size, dtype=torch.int16)
    if act_order:
        scales, zeros = scale, None if zero is None else zero.to(torch.int16)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]  # [N, B], [B, B]
        err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            if col_params is not None:
                scale = col_params[0][:, col]
                zero = None if col_params[1] is None else col_params[1][:, col]
            elif col % group_size == 0:
                g = col // group_size
                scale, zero = group_params(W1[:, i:i + group_size], bits, symmetric)  # [N], [N] or None
                scales[:, g] = scale
                if zeros is not None:
                    zeros[:, g] = zero.to(torch.int16)
            c = quantize_codes(W1[:, i:i + 1], scale, zero, bits)[:, 0]  # [N]
            codes[:, col] = c.to(torch.int16)
            wq = (c if zero is None else c - zero) * scale
            err = (W1[:, i] - wq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # feedback within the block
            err1[:, i] = err
        W[:, b1:] -= err1 @ U[b0:b1, b1:]  # the block's accumulated feedback onto later columns, one matmul
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return QTensor(out, scales.float(), zeros, bits, group_size, symmetric)


class _Stop(Exception):
    """Raised by the hook on `stop_after` to end a calibration forward early."""


def _stop(_m, _inp, _out):
    raise _Stop


def calibrate(model: nn.Module, token_batches: Iterable[torch.Tensor], layer_names: list[str] | None = None,
              skip_prefix: int = 4, stop_after: nn.Module | None = None) -> dict[str, HessianAccumulator]:
    """Run `model` (float, e.g. loaded in fp32) on each token id batch [B, T] and accumulate the inputs of the
    nn.Linear layers named in layer_names (default: all but lm_head). Memory: two fp64 K x K sums per layer.
    stop_after: a module after whose forward the rest of the model is skipped (nothing later is needed)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = layer_names if layer_names is not None else [nm for nm in linears if nm != "lm_head"]
    missing = [nm for nm in names if nm not in linears]
    if missing:
        raise ValueError(f"not nn.Linear modules of the model: {missing}")
    accs = {nm: HessianAccumulator(linears[nm].in_features, skip_prefix) for nm in names}
    hooks = [linears[nm].register_forward_hook(lambda _m, inp, _out, acc=accs[nm]: acc.add(inp[0].float()))
             for nm in names]
    if stop_after is not None:
        hooks.append(stop_after.register_forward_hook(_stop))
    try:
        with torch.no_grad():
            for ids in token_batches:
                try:
                    model(ids, logits_to_keep=1)  # the head's output is not needed
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return accs


def quantize_model_weights(model: nn.Module, hessians: dict[str, HessianAccumulator], method: str, bits: int = 4,
                           group_size: int = 128, symmetric: bool = True, **gptq_kwargs) -> dict[str, QTensor]:
    """Quantize the weight of each layer named in `hessians`: "rtn" ignores the Hessian, "gptq" uses all
    calibration positions, "pgptq" leaves out each sequence's first skip_prefix positions (needs skip_prefix > 0
    at calibration). The model is not modified."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = {}
    for name, acc in hessians.items():
        w = model.get_submodule(name).weight
        if method == "rtn":
            out[name] = quantize_int(w, bits, group_size, symmetric)
            continue
        if method == "pgptq" and acc.skip_prefix == 0:
            raise ValueError(f"{name}: P-GPTQ needs Hessians calibrated with skip_prefix > 0")
        H = acc.hessian(include_prefix=method == "gptq")
        out[name] = gptq_quantize(w, H, bits, group_size, symmetric, **gptq_kwargs)
    return out


def quantize_sequential(model: nn.Module, token_batches: list[torch.Tensor], method: str, bits: int = 4,
                        group_size: int = 128, symmetric: bool = True, skip_prefix: int = 4,
                        **gptq_kwargs) -> dict[str, QTensor]:
    """GPTQ / P-GPTQ decoder layer by decoder layer, as the GPTQ paper runs it: the Hessians of layer l come from
    the inputs the already quantized layers 0..l-1 produce, so each layer also corrects the error that reaches
    it. Within a layer every projection sees the float layer's inputs. Works on a copy (the model is not
    modified); costs about L/2 forwards of the calibration set for L layers."""
    work = copy.deepcopy(model).eval()
    out = {}
    for layer_idx, layer in enumerate(work.model.layers):
        prefix = f"model.layers.{layer_idx}."
        names = [prefix + nm for nm, m in layer.named_modules() if isinstance(m, nn.Linear)]
        accs = calibrate(work, token_batches, names, skip_prefix, stop_after=layer)
        qs = quantize_model_weights(work, accs, method, bits, group_size, symmetric, **gptq_kwargs)
        for name, q in qs.items():
            work.get_submodule(name).weight.data = dequantize(q).to(work.get_submodule(name).weight.dtype)
        out.update(qs)
    return out
