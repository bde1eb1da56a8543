"""nanoGPT in JAX/Flax."""

from .checkpoint import load_checkpoint
from .generate import generate
from .model import GPT, GPTConfig, init_params, make_model

__all__ = ["GPT", "GPTConfig", "generate", "init_params", "load_checkpoint", "make_model"]
