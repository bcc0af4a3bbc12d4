"""Run by scripts/test_aarch64.sh inside an emulated aarch64 Python (qemu-user), once per kernel tier: checks that
kernels/isa.py picks the tier the emulated CPU has, that kernels.native() loads the cross-compiled module
(MINICPM4_NATIVE_PREBUILT) and that each kernel agrees with its pure-PyTorch reference on small shapes, with the
tolerances of the x86 tests (tests/quant/test_int8.py, test_int4.py, test_ternary.py,
tests/sparse/test_sparse_native.py, tests/model/test_native.py).
Shapes stay small: emulated arithmetic runs tens of times slower than native. Exits 1 if any check fails."""

import ctypes
import os
import sys

import numpy as np
import torch

from minicpm4.kernels import build, isa

# qemu-user shows the host's /proc/cpuinfo, so isa.cpu_flags() would read x86 flags: take the emulated CPU's
# features from the auxiliary vector instead (what Linux derives its cpuinfo "Features" line from on arm64)
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
hwcap, hwcap2 = libc.getauxval(16), libc.getauxval(26)  # AT_HWCAP, AT_HWCAP2
BITS = {"asimd": (hwcap, 1), "asimddp": (hwcap, 20), "sve": (hwcap, 22), "i8mm": (hwcap2, 13), "bf16": (hwcap2, 14)}
flags = frozenset(name for name, (word, bit) in BITS.items() if word >> bit & 1)
isa.cpu_flags = lambda: flags

tier = os.environ["TIER"]
failures = []


def check(name, ok, detail=""):
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


print(f"{tier}: torch {torch.__version__}, CPU features {' '.join(sorted(flags))}")
check("isa picks this tier on this CPU", isa.machine() == "aarch64" and isa.best() == tier,
      f"machine {isa.machine()}, tiers {isa.supported()}")
ext = build.native()
if ext is None or ext.ISA != tier:
    check("the prebuilt module loads", False, f"{ext and ext.ISA}")
    sys.exit(1)
for op, path in ext.PATHS.items():
    print(f"  path  {op}: {path}")
g = torch.Generator().manual_seed(0)


def close(got, ref, ulp, x, w):  # within `ulp` of the magnitude the sum runs through, as the x86 tests hold it
    tol = ulp * (x.double().abs() @ w.abs().T) + 1e-3
    return bool((got.double() - ref).abs().le(tol).all())


from minicpm4.quant.int8 import Int8Linear  # noqa: E402

layer = Int8Linear.from_float(torch.randn(300, 128, generator=g))
w = layer.dequantize().double()
for rows in (1, 7, 40):  # few-row kernel up to 16 rows, bf16 GEMM beyond
    x = torch.randn(rows, 128, generator=g).bfloat16()
    check(f"int8 GEMM, {rows} rows", close(layer(x), x.double() @ w.T, 2 ** -7, x, w))

from minicpm4.quant.int4 import Int4Linear, torch_packs_like_us, unpack_q4_1  # noqa: E402
from minicpm4.quant.int8 import quantize_activations  # noqa: E402

check("our int4 kernel runs on this tier", "int8 activations" in ext.PATHS["int4 GEMM"], ext.PATHS["int4 GEMM"])
rng = np.random.default_rng(0)
n = 160  # random Q4_1 blocks: fp16 d and m, 16 bytes of nibbles per 32 weights; 2 whole 64-row blocks + 32 rows
d = rng.uniform(0.01, 0.1, (n, 4)).astype(np.float16).view(np.uint8).reshape(n, 4, 2)
m = rng.uniform(-1, 0, (n, 4)).astype(np.float16).view(np.uint8).reshape(n, 4, 2)
raw = np.concatenate([d, m, rng.integers(0, 256, (n, 4, 16), dtype=np.uint8)], -1).reshape(n, 80)
layer = Int4Linear.from_q4_1(raw)
q, dd, mm = unpack_q4_1(raw)
scale = torch.from_numpy(dd).bfloat16().double()
zero = torch.from_numpy(mm + 8 * dd).bfloat16().double()
w = ((torch.from_numpy(q).double().view(n, -1, 32) - 8) * scale[..., None] + zero[..., None]).view(n, -1)
for rows in (1, 5, 16, 40):
    x = torch.randn(rows, layer.in_features, generator=g).bfloat16()
    got = layer(x)
    check(f"int4 GEMM, {rows} rows", close(got, x.double() @ w.T, 2 ** -7, x, w))
    if rows <= 16:  # the few-row kernel's integer math, within the bounds of tests/quant/test_int4.py
        x8, dx = quantize_activations(x, layer.group_size)
        _, sc, ze = layer.unpack()
        xabs = x8.double().abs().view(rows, -1, layer.group_size).sum(-1)
        a = (dx.double() * xabs) @ (15 * sc.double().abs() + (ze - 8 * sc).double().abs())
        exact = layer.integer_reference(x)
        full = exact.shape[1]
        diff = (got[:, :full].double() - exact).abs()
        check(f"int4 few-row kernel, {rows} rows, equals its integer math",
              bool(diff.le(2 ** -8 * exact.abs() + 2 ** -16 * a).all()), f"max diff {diff.max():.2g}")
        check(f"int4 few-row kernel, {rows} rows: a row alone equals it among others",
              torch.equal(layer(x[rows - 1:]), got[rows - 1:]))
# torch packs int4 by its runtime CPU capability (on aarch64: rows in pairs), where ours is one layout (quant/int4.py
# pack): the fallback without a compiler hands torch's kernel a copy torch packed
print(f"  torch packs int4 like us: {torch_packs_like_us()}")
x = torch.randn(3, layer.in_features, generator=g).bfloat16()
got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.torch_packed(), layer.group_size, layer.scales_and_zeros)
check("int4 through torch's kernel on its own packing (no compiler)", close(got, x.double() @ w.T, 2 ** -7, x, w))

from minicpm4.quant.ternary import GEMV_MAX_ROWS, TernaryLinear  # noqa: E402

layer = TernaryLinear.from_float(torch.randn(203, 320, generator=g) * 0.05)  # 4-row blocks leave a tail
w = layer.dequantize().double()
for rows, dtype in ((1, torch.float32), (3, torch.bfloat16), (37, torch.bfloat16)):
    x = torch.randn(rows, 320, generator=g).to(dtype)
    ulp = 2 ** -7 if dtype == torch.bfloat16 or rows > GEMV_MAX_ROWS else 2 ** -20
    got = layer(x)
    check(f"ternary GEMV, {rows} rows {dtype}", got.dtype == dtype and close(got, x.double() @ w.T, ulp, x, w))

from minicpm4.sparse.decode import attend_one, select_one  # noqa: E402
from minicpm4.sparse.select import SparseConfig, compress_both, pad_kernels  # noqa: E402

cfg = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, init_blocks=1, topk=6, dense_len=-1)
for h, kvh, dim, s in ((9, 3, 64, 777), (4, 4, 80, 300)):  # GQA group 3; head_dim not a multiple of 32
    q, qs = (torch.randn(1, h, 1, dim, generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, kvh, s + 40, dim, generator=g).bfloat16()[:, :, :s] for _ in range(2))
    t = torch.tensor([s - 1])
    c1, c2 = (pad_kernels(c) for c in compress_both(k, cfg))
    k_sel = cfg.n_select(-(-s // cfg.block_size))
    idx_ref = select_one(qs, t, c1, c2, cfg, k_sel)
    out_ref = attend_one(q, k, v, t, idx_ref, cfg.block_size)
    out, idx = ext.sparse_decode(q.view(1, h, dim).contiguous(), qs.view(1, h, dim).contiguous(), k, v, c1, c2, t,
                                 cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.init_blocks,
                                 cfg.local_blocks, k_sel)
    diff = (out.view_as(out_ref).float() - out_ref.float()).abs().max().item()
    bound = 2 * 2.0 ** -8 * out_ref.float().abs().max().item()  # 2 bf16 ulps of the largest output
    check(f"InfLLM v2 decode step, {h}/{kvh} heads, d {dim}, {s} keys",
          torch.equal(idx, idx_ref) and diff <= bound, f"max diff {diff:.2g}")

from minicpm4.quant import kv8  # noqa: E402

for h, kvh, dim, s in ((9, 3, 64, 777), (4, 4, 80, 300)):  # the same over an int8 KV cache (load_i8 per tier)
    q = torch.randn(1, h, 1, dim, generator=g).bfloat16()
    (k8, ks), (v8, vs) = (kv8.quantize(torch.randn(1, kvh, s, dim, generator=g)) for _ in range(2))
    k, v = kv8.dequantize(k8, ks, torch.bfloat16), kv8.dequantize(v8, vs, torch.bfloat16)
    t = torch.tensor([s - 1])
    c1, c2 = (pad_kernels(c) for c in compress_both(k, cfg))
    k_sel = cfg.n_select(-(-s // cfg.block_size))
    idx_ref = select_one(q, t, c1, c2, cfg, k_sel)
    out_ref = attend_one(q, k, v, t, idx_ref, cfg.block_size)
    qc = q.view(1, h, dim).contiguous()
    out, idx = ext.sparse_decode_q8(qc, qc, k8, v8, ks, vs, c1, c2, t, cfg.kernel_size, cfg.kernel_stride,
                                    cfg.block_size, cfg.init_blocks, cfg.local_blocks, k_sel)
    diff = (out.view_as(out_ref).float() - out_ref.float()).abs().max().item()
    bound = 4 * 2.0 ** -8 * out_ref.float().abs().max().item()  # tests/model/test_kv8.py's bound
    check(f"InfLLM v2 decode step, int8 KV cache, {h}/{kvh} heads, d {dim}, {s} keys",
          torch.equal(idx, idx_ref) and diff <= bound, f"max diff {diff:.2g}")

import copy  # noqa: E402

from minicpm4.config import tiny  # noqa: E402
from minicpm4.model.decoder import MiniCPM4ForCausalLM  # noqa: E402
from minicpm4.model.kv_cache import KVCache  # noqa: E402
from minicpm4.model.native_stack import attach  # noqa: E402


def decode_logits(model, ids, steps, dtype, kv_dtype="auto"):  # teacher-forced: prefill, then one token a step
    n = ids.shape[1] - steps                                       # -> [1, steps, V]
    cache = KVCache(model.config, 1, ids.shape[1], dtype=dtype, kv_dtype=kv_dtype)
    with torch.no_grad():
        model(ids[:, :n], cache=cache)
        return torch.stack([model(ids[:, n + i:n + i + 1], cache=cache)[:, -1] for i in range(steps)], 1)


torch.manual_seed(0)  # the tiny MiniCPM4 config (muP multipliers, GQA): the whole decode step in C++ (decode_stack.h)
m32 = MiniCPM4ForCausalLM(tiny()).eval()
m = attach(copy.deepcopy(m32).to(torch.bfloat16))
ids = torch.randint(0, 512, (1, 24))
truth = decode_logits(m32, ids, 4, torch.float32)
calls, stack_call = [], type(m.native).__call__
type(m.native).__call__ = lambda self, *a, **k: calls.append(1) or stack_call(self, *a, **k)
native = decode_logits(m, ids, 4, torch.bfloat16)
type(m.native).__call__ = stack_call
check("the C++ decode stack runs the prefill and each step", len(calls) == 5, f"{len(calls)} calls")
m.native = None
python = decode_logits(m, ids, 4, torch.bfloat16)
err, ref_err = (native - truth).abs().mean().item(), (python - truth).abs().mean().item()
check("decode stack as close to fp32 as the Python layers", err <= 1.25 * ref_err,
      f"mean error {err:.3g}, Python layers {ref_err:.3g}")

native8 = decode_logits(attach(m), ids, 4, torch.bfloat16, "int8")  # the stack on an int8 KV cache
m.native = None
python8 = decode_logits(m, ids, 4, torch.bfloat16, "int8")
check("decode stack on an int8 KV cache agrees with the Python layers",
      (native8 - python8).abs().mean().item() < 0.02 * python8.abs().mean().item())

sys.exit(1 if failures else 0)
