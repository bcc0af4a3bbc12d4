"""Native CPU kernels: `extension(name)` compiles minicpm4/kernels/csrc/<name>.cpp once and returns the loaded module.

The build goes through torch.utils.cpp_extension.load (ninja), into a cache directory under
~/.cache/minicpm4/native (MINICPM4_NATIVE_CACHE overrides it) named after a hash of the source, the flags, the
torch version and the CPU's instruction-set flags, so an edited kernel or another machine never reuses a stale
build. Flags: -O3, OpenMP (at::parallel_for runs on torch's own OpenMP pool), and -march=native where the
compiler accepts it (the kernels pick AVX-512 paths with #ifdef and keep a portable scalar path otherwise).

Where no C++ compiler or ninja is found, or the build fails, `extension` warns once per name and returns None;
callers then run their pure-PyTorch reference path. MINICPM4_NATIVE=0 disables native kernels altogether.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent / "csrc"


def cache_root() -> Path:
    return Path(os.environ.get("MINICPM4_NATIVE_CACHE", Path.home() / ".cache" / "minicpm4" / "native"))


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return cxx if shutil.which(cxx) else None


@functools.cache
def _march_native(cxx: str) -> bool:
    """Whether `cxx` accepts -march=native (clang on some targets and old gcc do not)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.cpp"
        src.write_text("int main() { return 0; }\n")
        return subprocess.run([cxx, "-march=native", "-c", str(src), "-o", str(Path(d) / "t.o")],
                              capture_output=True).returncode == 0


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux lists them in /proc/cpuinfo (e.g. "avx2", "avx512_bf16"); elsewhere
    the one word platform.processor() gives."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / aarch64
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    import platform
    return frozenset(platform.processor().split())


def _build_dir(name: str, source: bytes, flags: list[str]) -> Path:
    import torch
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), torch.__version__.encode(),
                                     " ".join(sorted(cpu_flags())).encode()])).hexdigest()[:16]
    return cache_root() / f"{name}-{key}"


STALE_LOCK_S = 600  # a build takes a minute or two; a lock this old belongs to a build that was killed


def remove_stale_lock(build: Path) -> bool:
    """torch's cpp_extension marks a build in progress by the file `lock` in its directory and waits, forever, for
    it to go away; a build killed mid-way (Ctrl-C, kill -9) leaves it behind. Remove it once it is older than any
    build takes; returns whether it did."""
    lock = build / "lock"
    try:
        stale = time.time() - lock.stat().st_mtime > STALE_LOCK_S
    except FileNotFoundError:
        return False
    if stale:
        warnings.warn(f"minicpm4: removing {lock}, left by a kernel build that did not finish", RuntimeWarning,
                      stacklevel=2)
        lock.unlink(missing_ok=True)
    return stale


def extension(name: str) -> ModuleType | None:
    """The compiled module of minicpm4/kernels/csrc/<name>.cpp, or None (with one warning) where it cannot be built.
    MINICPM4_NATIVE=0 is read at every call, so it can be switched off after a build."""
    if os.environ.get("MINICPM4_NATIVE", "1") == "0":
        return None
    return _build(name)


@functools.cache
def _build(name: str) -> ModuleType | None:
    src = CSRC / f"{name}.cpp"
    if not src.is_file():
        raise FileNotFoundError(f"no native source {src}")
    # the `ninja` wheel installs its binary next to the interpreter, which is not on PATH without an activated venv
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    cxx = _compiler()
    if cxx is None or shutil.which("ninja") is None:
        missing = "a C++ compiler (c++ / $CXX)" if cxx is None else "ninja (pip install ninja)"
        warnings.warn(f"minicpm4 native kernel {name!r} unavailable: {missing} not found; using the slower "
                      "pure-PyTorch path", RuntimeWarning, stacklevel=2)
        return None
    flags = ["-O3", "-fopenmp"] + (["-march=native"] if _march_native(cxx) else [])
    # the csrc/ headers it includes count too: a kernel shared through a header rebuilds every includer
    source = src.read_bytes()
    source += b"".join((CSRC / h).read_bytes() for h in re.findall(r'^#include "(\w+\.h)"', source.decode(), re.M))
    build = _build_dir(name, source, flags)
    build.mkdir(parents=True, exist_ok=True)
    remove_stale_lock(build)
    from torch.utils import cpp_extension
    try:
        return cpp_extension.load(name=f"minicpm4_{name}", sources=[str(src)], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as e:  # compiler errors, missing headers: fall back rather than fail the caller
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"minicpm4 native kernel {name!r} failed to build in {build} ({first}); using the slower "
                      "pure-PyTorch path", RuntimeWarning, stacklevel=2)
        return None
