"""Atomic file writes: write a temp file beside the target, then rename it into place.

A reader never sees a half-written file, and an interrupted write leaves the previous version intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path) on a temp file next to `path`, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
