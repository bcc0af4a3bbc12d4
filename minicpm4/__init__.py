"""minicpm4: MiniCPM4 in Python on CPU. `load()` a model, generate with `Engine` (token ids) or `LLM` (text)."""

from minicpm4.config import ModelConfig
from minicpm4.engine import Engine, Generation
from minicpm4.errors import CheckpointError, ConfigError, InputError, MiniCPM4Error
from minicpm4.loader import load, save_pretrained
from minicpm4.llm import LLM
from minicpm4.model import MiniCPM4ForCausalLM
from minicpm4.sampling import SamplingParams

__all__ = ["load", "save_pretrained", "LLM", "Engine", "Generation", "SamplingParams", "ModelConfig",
           "MiniCPM4ForCausalLM", "MiniCPM4Error", "CheckpointError", "ConfigError", "InputError"]
