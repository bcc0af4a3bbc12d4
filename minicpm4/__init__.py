"""minicpm4: MiniCPM4 in Python on CPU. `load()` a model, generate with `Engine` (token ids) or `LLM` (text).

The package is lazy (PEP 562): `import minicpm4` imports neither torch nor any subpackage; each public name below
is imported on first use, so `minicpm4 --help` and tools that only read `minicpm4.__version__` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load": "minicpm4.io.loader", "save_pretrained": "minicpm4.io.loader",
    "LLM": "minicpm4.serve.llm",
    "Engine": "minicpm4.engine.engine", "Generation": "minicpm4.engine.engine",
    "SamplingParams": "minicpm4.engine.sampling",
    "ModelConfig": "minicpm4.config",
    "MiniCPM4ForCausalLM": "minicpm4.model.decoder",
    "MiniCPM4Error": "minicpm4.errors", "CheckpointError": "minicpm4.errors", "ConfigError": "minicpm4.errors",
    "InputError": "minicpm4.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'minicpm4' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from minicpm4.config import ModelConfig
    from minicpm4.engine.engine import Engine, Generation
    from minicpm4.engine.sampling import SamplingParams
    from minicpm4.errors import CheckpointError, ConfigError, InputError, MiniCPM4Error
    from minicpm4.io.loader import load, save_pretrained
    from minicpm4.model.decoder import MiniCPM4ForCausalLM
    from minicpm4.serve.llm import LLM
