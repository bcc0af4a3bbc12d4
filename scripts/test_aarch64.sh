#!/usr/bin/env bash
# The native kernels on aarch64, by emulation on an x86-64 Debian machine: cross-compile csrc/ops.cpp once per
# aarch64 tier (kernels/isa.py: neon, neon_dotprod, neon_bf16) and check each build under qemu-user against the
# pure-PyTorch references, on an emulated CPU that has exactly that tier's features.
#
#   scripts/test_aarch64.sh [TIER...]          (default: every aarch64 tier; run as root, or with the tools installed)
#
# Everything it fetches is cached under $MINICPM4_AARCH64_CACHE (default ~/.cache/minicpm4/aarch64), so a second run
# only compiles what changed and runs the checks:
#   - Debian's qemu-user and g++-aarch64-linux-gnu (apt-get, once);
#   - an arm64 Python 3.11 extracted from Debian's arm64 packages into sysroot/ (never installed system-wide);
#   - PyPI's aarch64 CPU build of torch (pip install --target), the newest one that is not a CUDA build: PyPI's
#     aarch64 wheels of 2.11 on depend on the CUDA toolkit. 2.6 is the oldest with the int4 CPU layout we use.
# A compiler cannot run inside the emulated process (qemu-user without binfmt cannot exec host binaries), so the
# module is built natively with the cross compiler and handed to kernels.native() through
# MINICPM4_NATIVE_PREBUILT (kernels/build.py). One Python process per tier: an emulated start takes ~25 s.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MINICPM4_AARCH64_CACHE:-$HOME/.cache/minicpm4/aarch64}
TORCH=${MINICPM4_AARCH64_TORCH:-2.10.0}
SYSROOT=$CACHE/sysroot
SITE=$CACHE/site-torch$TORCH
HOST_PY=${PYTHON:-python3}  # any Python 3.11+ on the host: only isa.py's flag table is read with it
TIERS=("$@")
[ ${#TIERS[@]} -gt 0 ] || TIERS=(neon neon_dotprod neon_bf16)
# the emulated CPU per tier: a QEMU model with the tier's features and none of the next tier's, so that an
# instruction beyond the tier faults: a64fx (ARMv8.2 + SVE, no dotprod), cortex-a76 (+ dotprod), max (+ bf16, i8mm).
# Not an ARMv8.0 model (cortex-a53): torch's own aarch64 wheels need ARMv8.2 and fault there on import.
declare -A CPU=([neon]=a64fx [neon_dotprod]=cortex-a76 [neon_bf16]=max)
mkdir -p "$CACHE"
log() { printf '[aarch64] %s\n' "$*" >&2; }

# 1. tools
need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
updated=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    log "adding Debian's arm64 architecture"; dpkg --add-architecture arm64; apt-get update -q >/dev/null; updated=1
fi
if [ ${#need[@]} -gt 0 ]; then
    [ $updated = 1 ] || apt-get update -q >/dev/null
    log "installing ${need[*]}"; DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi

# 2. an arm64 Python 3.11 in a sysroot
PKGS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev python3.11-dev
      libc6 libexpat1 zlib1g libssl3 libffi8 libstdc++6 libgcc-s1 libgomp1 libbz2-1.0 liblzma5 libsqlite3-0
      libncursesw6 libtinfo6 libreadline8 libuuid1 libdb5.3 libgdbm6 libcrypt1 libnsl2 libtirpc3 libzstd1)
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
    log "extracting an arm64 Python 3.11 into $SYSROOT"
    rm -rf "$CACHE/debs" "$SYSROOT.tmp" && mkdir -p "$CACHE/debs" "$SYSROOT.tmp"
    (cd "$CACHE/debs" && apt-get download -q "${PKGS[@]/%/:arm64}" >/dev/null 2>&1) ||
        { apt-get update -q >/dev/null && (cd "$CACHE/debs" && apt-get download -q "${PKGS[@]/%/:arm64}" >/dev/null); }
    for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT.tmp"; done
    rm -rf "$SYSROOT" "$CACHE/debs" && mv "$SYSROOT.tmp" "$SYSROOT"
fi

# 3. torch for aarch64 (CPU build) and what minicpm4's kernel modules import, pure-Python packages included
if [ ! -f "$SITE/.complete" ]; then
    log "installing torch $TORCH for aarch64 into $SITE"
    rm -rf "$SITE"
    "$HOST_PY" -m pip install -q --no-deps --target "$SITE" --platform manylinux2014_aarch64 \
        --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --only-binary=:all: \
        "torch==$TORCH" numpy typing_extensions sympy mpmath filelock networkx jinja2 markupsafe fsspec tqdm
    if ls "$SITE"/torch/lib/libtorch_cuda*.so >/dev/null 2>&1; then
        log "torch $TORCH for aarch64 is a CUDA build: pick a CPU one with MINICPM4_AARCH64_TORCH"; exit 1
    fi
    touch "$SITE/.complete"
fi

# 4. cross-compile ops.cpp per tier, as kernels/build.py compiles it (its flags; the C++ standard, ABI and
# defines that torch's cpp_extension of this torch version passes), into a directory named after the inputs
TORCH_INC=$SITE/torch/include
STD=-$(grep -o "common_cflags += \['-std=c++[0-9]*" "$SITE/torch/utils/cpp_extension.py" | grep -o "std=c++[0-9]*")
# libstdc++'s new string ABI names its symbols std::__cxx11::...; torch's old-ABI builds (before 2.7) have none
ABI=-D_GLIBCXX_USE_CXX11_ABI=$(grep -q __cxx11 "$SITE/torch/lib/libc10.so" && echo 1 || echo 0)
build_tier() {  # prints the directory holding minicpm4_native_$1.so
    local tier=$1 flags key out
    flags="-O3 -fopenmp -fvisibility=hidden -DMINICPM4_ISA_NAME=$tier $(cd "$REPO" && PYTHONPATH="$REPO" "$HOST_PY" -c \
        "from minicpm4.kernels import isa; print(' '.join(isa.ARM['$tier'][1]))")"
    key=$(cat "$REPO"/minicpm4/kernels/csrc/* <(echo "$flags $STD $ABI $TORCH") | sha256sum | cut -c1-16)
    out=$CACHE/build/$tier-$key
    if [ ! -f "$out/minicpm4_native_$tier.so" ]; then
        log "cross-compiling $tier: $flags"
        mkdir -p "$out"
        aarch64-linux-gnu-g++ $flags "$STD" "$ABI" -shared -fPIC -DTORCH_API_INCLUDE_EXTENSION_H \
            -DTORCH_EXTENSION_NAME="minicpm4_native_$tier" \
            -I "$TORCH_INC" -I "$TORCH_INC/torch/csrc/api/include" -I "$SYSROOT/usr/include/python3.11" \
            -idirafter "$SYSROOT/usr/include" \
            "$REPO/minicpm4/kernels/csrc/ops.cpp" -o "$out/minicpm4_native_$tier.so.tmp" \
            -L "$SITE/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python -fopenmp || return 1
        mv "$out/minicpm4_native_$tier.so.tmp" "$out/minicpm4_native_$tier.so"
    fi
    echo "$out"
}

# 5. per tier, one emulated Python running scripts/aarch64_checks.py
status=0
for tier in "${TIERS[@]}"; do
    [ -n "${CPU[$tier]:-}" ] || { log "unknown aarch64 tier $tier (known: ${!CPU[*]})"; exit 2; }
    t0=$(date +%s)
    if ! dir=$(build_tier "$tier"); then log "$tier: the cross-compile FAILED"; status=1; continue; fi
    t1=$(date +%s)
    log "$tier: running the checks under qemu-aarch64 -cpu ${CPU[$tier]}"
    if qemu-aarch64 -L "$SYSROOT" -cpu "${CPU[$tier]}" \
        -E PYTHONPATH="$SITE:$REPO" -E LD_LIBRARY_PATH="$SITE/torch/lib" -E MINICPM4_NATIVE_PREBUILT="$dir" \
        -E PYTHONDONTWRITEBYTECODE=1 -E TIER="$tier" -E OMP_NUM_THREADS=2 \
        "$SYSROOT/usr/bin/python3.11" "$REPO/scripts/aarch64_checks.py"
    then result=passed; else result=FAILED; status=1; fi
    t2=$(date +%s)
    log "$tier: $result (build $((t1 - t0)) s, emulated checks $((t2 - t1)) s)"
done
exit $status
