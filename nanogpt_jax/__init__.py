"""nanoGPT in JAX/Flax."""

from .generate import generate, generate_stream
from .load import load_checkpoint
from .model import GPT, GPTConfig, init_params, make_model
from .pretrained import from_pretrained, save_pretrained

__all__ = ["GPT", "GPTConfig", "from_pretrained", "generate", "generate_stream", "init_params", "load_checkpoint", "make_model",
           "save_pretrained"]
