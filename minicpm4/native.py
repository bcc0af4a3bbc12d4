"""C++ kernels in minicpm4/csrc/, compiled on first use with torch's cpp_extension and cached.

    mod = extension("decode")   # the compiled module of csrc/decode.cpp, or None (with one warning)

Each kernel has a pure-PyTorch reference that runs when the extension is unavailable (no compiler, no ninja,
MINICPM4_NATIVE=0), so nothing depends on a build succeeding; tests compare the two. Builds go to
$MINICPM4_HOME/native (default ~/.cache/minicpm4/native), one folder per source hash and torch version, so an
edited source or another torch rebuilds instead of loading a stale binary. Compilation takes ~30-60 s once.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
_cache: dict[str, object] = {}
_lock = threading.Lock()


def _build_root() -> Path:
    return Path(os.environ.get("MINICPM4_HOME", Path.home() / ".cache" / "minicpm4")) / "native"


def enabled() -> bool:
    return os.environ.get("MINICPM4_NATIVE", "1") != "0"


def extension(name: str):
    """The compiled module for csrc/<name>.cpp, or None when it cannot be built (warned once)."""
    if not enabled():
        return None
    with _lock:
        if name not in _cache:
            _cache[name] = _build(name)
        return _cache[name]


def _build(name: str):
    src = CSRC / f"{name}.cpp"
    digest = hashlib.sha256(src.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    build_dir = _build_root() / f"{name}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # the `ninja` wheel puts its binary next to the interpreter, which is not on PATH without an activated venv
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    try:
        from torch.utils import cpp_extension
        # -march=native: the build happens on the machine that runs it; AVX-512 where the CPU has it
        return cpp_extension.load(name=f"minicpm4_{name}_{digest}", sources=[str(src)], build_directory=str(build_dir),
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: fall back to the PyTorch reference
        warnings.warn(f"minicpm4: could not build the native '{name}' kernels ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); using the PyTorch path",
                      RuntimeWarning, stacklevel=3)
        return None
