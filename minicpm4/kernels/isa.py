"""Which instruction-set variant of the native kernels this CPU runs: the CPU's features, the variants ("tiers")
it can run, and the one chosen.

The kernels in csrc/ are one source compiled once per tier with that tier's compiler flags; each `#if` on a
compiler macro (__AVX2__, __AVX512VNNI__, __AVX512BF16__, __ARM_FEATURE_DOTPROD, ...) picks the code the tier
has, down to portable C++ for `scalar`. The tier is chosen at run time:

    x86-64   scalar < avx2 (AVX2 + FMA + F16C) < avx512 (F/BW/VL/DQ + VNNI) < avx512_bf16 (+ AVX512-BF16)
    aarch64  neon (ARMv8 Advanced SIMD, which every aarch64 CPU has) < neon_dotprod (+ SDOT/UDOT)
             < neon_bf16 (+ BF16, I8MM)

The best tier the CPU has, or MINICPM4_ISA=<tier> to force a lower one (tests and benchmarks run every tier this
way). An AVX-512 CPU without VNNI (Skylake-SP) runs the avx2 tier.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

from minicpm4.errors import MiniCPM4Error

# tier -> (CPU flags it needs as /proc/cpuinfo names them, compiler flags); lowest first. CPU_CAPABILITY_* is
# what ATen's at::vec::Vectorized reads to pick its 256- or 512-bit implementation (its NEON one on aarch64).
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
_AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
           "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
X86 = {
    "scalar": (frozenset(), ["-march=x86-64", "-DCPU_CAPABILITY=DEFAULT"]),
    "avx2": (frozenset({"avx2", "fma", "f16c"}), ["-march=x86-64", *_AVX2]),
    "avx512": (frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),
               ["-march=x86-64", *_AVX512]),
    "avx512_bf16": (frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                               "avx512_bf16"}),
                    ["-march=x86-64", *_AVX512, "-mavx512bf16"]),
}
ARM = {
    "neon": (frozenset({"asimd"}), ["-march=armv8-a"]),
    "neon_dotprod": (frozenset({"asimd", "asimddp"}), ["-march=armv8.2-a+dotprod+fp16"]),
    "neon_bf16": (frozenset({"asimd", "asimddp", "bf16", "i8mm"}), ["-march=armv8.6-a+dotprod+fp16+bf16+i8mm"]),
}
BF16_TIERS = frozenset({"avx512_bf16", "neon_bf16"})  # tiers with native bf16 dot products


def machine() -> str:
    m = platform.machine().lower()
    return "aarch64" if m in ("aarch64", "arm64") else "x86_64" if m in ("x86_64", "amd64") else m


def table() -> dict[str, tuple[frozenset[str], list[str]]]:
    """The tiers of this machine's architecture (an empty table elsewhere: only the PyTorch paths run)."""
    return {"x86_64": X86, "aarch64": ARM}.get(machine(), {})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux lists them in /proc/cpuinfo ("avx2", "avx512_bf16", "asimddp");
    on macOS the same names derived from sysctl; elsewhere the one word platform.processor() gives."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / aarch64
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    if platform.system() == "Darwin" and machine() == "aarch64":  # Apple silicon: NEON + dotprod everywhere
        flags = {"asimd", "asimddp"}
        for feat, name in (("FEAT_BF16", "bf16"), ("FEAT_I8MM", "i8mm")):
            r = subprocess.run(["sysctl", "-n", f"hw.optional.arm.{feat}"], capture_output=True, text=True)
            if r.stdout.strip() == "1":
                flags.add(name)
        return frozenset(flags)
    return frozenset(platform.processor().lower().split())


def supported() -> list[str]:
    """The tiers this CPU can run, lowest first."""
    flags = cpu_flags()
    return [t for t, (need, _) in table().items() if need <= flags]


def best() -> str | None:
    tiers = supported()
    return tiers[-1] if tiers else None


def selected() -> str | None:
    """The tier the kernels run: MINICPM4_ISA where set (read at every call, so tests can switch it), else the
    best one. None on an architecture without tiers."""
    forced = os.environ.get("MINICPM4_ISA", "").strip()
    if not forced:
        return best()
    tiers = table()
    if forced not in tiers:
        raise MiniCPM4Error(f"MINICPM4_ISA={forced!r} is not a kernel variant of {machine()}; "
                            f"choose one of {', '.join(tiers) or '(none: this architecture has no native kernels)'}")
    if forced not in supported():
        missing = sorted(tiers[forced][0] - cpu_flags())
        raise MiniCPM4Error(f"MINICPM4_ISA={forced!r}: this CPU lacks {', '.join(missing)}; it runs "
                            f"{', '.join(supported())}")
    return forced


def compile_flags(tier: str) -> list[str]:
    return list(table()[tier][1])


def native_bf16() -> bool:
    """Whether bf16 matmuls run on native bf16 dot products here: our selected tier has them, and so does the
    CPU for torch's own kernels (oneDNN uses AMX-BF16 / AVX512-BF16 where present). False where MINICPM4_ISA
    names no tier this CPU runs (native() raises that error with its reason)."""
    try:
        return selected() in BF16_TIERS
    except MiniCPM4Error:
        return False


def torch_environment(tier: str) -> dict[str, str]:
    """Variables that hold torch's own CPU kernels to the same instruction sets as `tier` (set before torch is
    imported; torch reads them once), so that a forced lower tier measures what a CPU of that tier gets."""
    if machine() != "x86_64":
        return {}
    aten = {"scalar": "default", "avx2": "avx2"}.get(tier, "avx512")
    onednn = {"scalar": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE_VNNI"}.get(tier, "ALL")
    env = {"ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn}
    # MKL picks its own code path (torch's fp32 GEMMs, and SDPA's blocks with it): without this cap a forced avx2
    # tier still ran SDPA on AVX-512 / AMX (one core, causal 4K: 181 GFLOP/s, above AVX2's FMA peak; 73 capped)
    mkl = {"scalar": "SSE4_2", "avx2": "AVX2", "avx512": "AVX512"}.get(tier)
    if mkl:
        env["MKL_ENABLE_INSTRUCTIONS"] = mkl
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model name")):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or machine()


# the CPU features that decide a tier or a kernel's path, in the order report() prints them
NOTABLE = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
           "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "bf16", "i8mm", "sve")


def report(module=None) -> list[str]:
    """Lines naming the CPU, its notable features, the tiers it runs, the selected one and, given the built
    module of that tier, the code path of each op (`minicpm4 info --system`, `.ci/run`)."""
    flags = cpu_flags()
    try:
        chosen = selected()
    except MiniCPM4Error as e:
        chosen = f"(error: {e})"
    lines = [f"cpu: {cpu_model()} ({machine()}, {os.cpu_count()} logical cores)",
             f"features: {' '.join(f for f in NOTABLE if f in flags) or '(none of the notable ones)'}",
             f"kernel tiers this CPU runs: {', '.join(supported()) or '(none: PyTorch paths only)'}",
             f"selected tier: {chosen}" + (" (MINICPM4_ISA)" if os.environ.get("MINICPM4_ISA") else ""),
             f"bf16 matmuls: {'native (bf16 dot products)' if native_bf16() else 'emulated: compute in fp32'}"]
    if module is not None:
        lines += [f"  {op}: {path}" for op, path in module.PATHS.items()]
    return lines

