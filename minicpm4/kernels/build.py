"""Native CPU kernels: `native()` compiles minicpm4/kernels/csrc/ops.cpp for the selected instruction-set tier
(kernels/isa.py) once and returns the loaded module.

The build goes through torch.utils.cpp_extension.load (ninja), into a cache directory under
~/.cache/minicpm4/native (MINICPM4_NATIVE_CACHE overrides it) named after the tier and a hash of the sources,
the flags and the torch version, so an edited kernel never reuses a stale build. Flags: -O3, OpenMP
(at::parallel_for runs on torch's own OpenMP pool) and the tier's instruction sets, never -march=native: a tier's
build runs on every CPU of that tier, and a lower tier can be built and tested on a higher CPU.

Where no C++ compiler or ninja is found, a header is missing, or the build fails, `native` warns once per tier
and returns None; callers then run their pure-PyTorch reference path. MINICPM4_NATIVE=0 disables native kernels
altogether.

MINICPM4_NATIVE_PREBUILT=DIR loads DIR/minicpm4_native_<tier>.so, built elsewhere, instead of compiling: for a
machine that cannot run the compiler (scripts/test_aarch64.sh cross-compiles the aarch64 tiers and loads them
under emulation) or modules shipped prebuilt. A tier missing there, or one that does not load, warns and returns
None as a failed build does; it is never compiled in its place, so a broken prebuilt set is not hidden.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

from minicpm4.errors import MiniCPM4Error
from minicpm4.kernels import isa

CSRC = Path(__file__).resolve().parent / "csrc"


def cache_root() -> Path:
    return Path(os.environ.get("MINICPM4_NATIVE_CACHE", Path.home() / ".cache" / "minicpm4" / "native"))


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return cxx if shutil.which(cxx) else None


def sources() -> bytes:
    """ops.cpp and every header in csrc/, the build's inputs (a missing one raises FileNotFoundError)."""
    files = [CSRC / "ops.cpp", *sorted(CSRC.glob("*.h"))]
    return b"\0".join(f.name.encode() + b"\0" + f.read_bytes() for f in files)


def _build_dir(tier: str, source: bytes, flags: list[str]) -> Path:
    import torch
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), torch.__version__.encode()])).hexdigest()[:16]
    return cache_root() / f"{tier}-{key}"


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


def native(tier: str | None = None) -> ModuleType | None:
    """The compiled kernels for `tier` (default: isa.selected(), i.e. MINICPM4_ISA or the best this CPU runs), or
    None (with one warning per tier) where they cannot be built. MINICPM4_NATIVE=0 and MINICPM4_ISA are read at
    every call, so tests can switch them after a build."""
    if os.environ.get("MINICPM4_NATIVE", "1") == "0":
        return None
    if tier is None:
        tier = isa.selected()
    elif tier not in isa.supported():
        raise MiniCPM4Error(f"kernel tier {tier!r} does not run on this CPU (it runs {', '.join(isa.supported())})")
    prebuilt = os.environ.get("MINICPM4_NATIVE_PREBUILT")
    return _load_prebuilt(tier or "generic", prebuilt) if prebuilt else _build(tier or "generic")


def _unavailable(tier: str, why: str) -> None:
    warnings.warn(f"minicpm4 native kernels ({tier}) unavailable: {why}; using the slower pure-PyTorch path",
                  RuntimeWarning, stacklevel=3)


@functools.cache
def _load_prebuilt(tier: str, directory: str) -> ModuleType | None:
    name = f"minicpm4_native_{tier}"  # the module's PyInit_ name, as TORCH_EXTENSION_NAME set it
    path = Path(directory) / f"{name}.so"
    if not path.is_file():
        _unavailable(tier, f"MINICPM4_NATIVE_PREBUILT has no {path}")
        return None
    import torch  # noqa: F401  (loads libc10 / libtorch, which the module links against)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as e:  # another architecture, another torch's ABI, a missing library
        _unavailable(tier, f"{path} does not load ({e})")
        return None
    return module


@functools.cache
def _build(tier: str) -> ModuleType | None:
    # the `ninja` wheel installs its binary next to the interpreter, which is not on PATH without an activated venv
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    cxx = _compiler()
    if cxx is None or shutil.which("ninja") is None:
        _unavailable(tier, f"{'a C++ compiler (c++ / $CXX)' if cxx is None else 'ninja (pip install ninja)'} not found")
        return None
    try:
        source = sources()
    except FileNotFoundError as e:  # an install without csrc/'s headers
        _unavailable(tier, f"{e.filename} is missing from the installed package")
        return None
    flags = ["-O3", "-fopenmp", "-fvisibility=hidden", f"-DMINICPM4_ISA_NAME={tier}"]
    flags += isa.compile_flags(tier) if tier in isa.table() else []
    build = _build_dir(tier, source, flags)
    build.mkdir(parents=True, exist_ok=True)
    remove_stale_lock(build)
    from torch.utils import cpp_extension
    try:
        return cpp_extension.load(name=f"minicpm4_native_{tier}", sources=[str(CSRC / "ops.cpp")],
                                  extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(build),
                                  verbose=False)
    except Exception as e:  # compiler errors: fall back rather than fail the caller
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _unavailable(tier, f"the build in {build} failed ({first})")
        return None
