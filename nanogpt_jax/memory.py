"""The memory a model needs, estimated from its config before anything is built, against what this machine has:
an absurd size (a million layers, a billion positions, a billion new tokens) is refused in one line instead of
allocating until the machine dies. Estimates are rough lower bounds (what must be held, not what XLA adds), so
that a run they refuse cannot fit, and a run that fits is never refused."""

import os

import jax
import jax.numpy as jnp

from .config import UserError
from .model import DTYPES, GPTConfig

ADAMW_BYTES = 16  # per parameter while training: float32 params, gradients, AdamW's two moments


class OutOfMemoryError(UserError):
    """A run that cannot fit in this machine's memory."""


def param_count(config: GPTConfig) -> int:
    """Parameters of the model `config` describes (tied lm_head counted once), counted without building it."""
    V, C, L, T = config.vocab_size, config.n_embd, config.n_layer, config.block_size
    if not config.has_attention:
        return V * V
    b = 1 if config.bias else 0
    ln = C * (1 + b)
    block = 2 * ln + C * 3 * C + b * 3 * C + C * C + b * C + C * 4 * C + b * 4 * C + 4 * C * C + b * C
    return V * C + T * C + L * block + ln


def activation_bytes(config: GPTConfig, rows: int) -> int:
    """What one forward and backward pass over `rows` windows of block_size tokens holds for the backward pass:
    per layer about 17 values per token and channel plus the attention probabilities (one layer's with remat),
    and the float32 logits with their gradient."""
    T, C, N = config.block_size, config.n_embd, config.n_head
    logits = 2 * 4 * rows * T * config.vocab_size
    if not config.has_attention:
        return logits
    per_layer = rows * T * (17 * C + N * T) * jnp.dtype(DTYPES[config.dtype]).itemsize
    return logits + per_layer * (1 if config.remat else config.n_layer)


def remat_saves_memory() -> bool:
    """XLA:CPU drops the optimization barriers that jax.checkpoint puts around a block, and common-subexpression
    elimination then merges the recomputed forward pass into the saved one: on a CPU remat keeps every layer's
    activations (the compiled step's temp memory is the same with and without it)."""
    return jax.default_backend() != "cpu"


def training_bytes(config: GPTConfig, rows: int, devices: int, fsdp: int) -> int:
    """One training step on `devices` devices, `rows` windows per pass over all of them: the state, sharded over
    fsdp and copied on each data-parallel replica, and the activations."""
    return ADAMW_BYTES * param_count(config) * max(devices // fsdp, 1) + activation_bytes(config, rows)


def generate_bytes(config: GPTConfig, batch: int, prompt: int, new_tokens: int) -> int:
    """`generate` for `batch` rows: the float32 params, the KV cache, the token ids and one PRNG key per new
    token on the device, and the ids again on the host as an array and as Python lists for decoding."""
    total = prompt + new_tokens
    head = config.n_embd if config.has_attention else 0
    cache = 2 * config.n_layer * batch * config.block_size * head * jnp.dtype(DTYPES[config.dtype]).itemsize
    return 4 * param_count(config) + cache + batch * total * (4 + 4 + 8) + 8 * new_tokens


def host_bytes() -> int:
    """Physical memory of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_bytes() -> int:
    """Memory of this process's accelerators, summed (their memory_stats' limit); the host's memory when they
    report none (CPU devices share the host's)."""
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
    return sum(limits) if limits and all(limits) else host_bytes()


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def refuse_unless_it_fits(need: int, what: str, advice: str) -> None:
    """One line with both figures when `need` bytes (over all processes) exceed the memory of the run's devices."""
    have = device_bytes() * jax.process_count()
    if need > have:
        raise OutOfMemoryError(f"{what} needs about {gib(need)} of memory and this machine has {gib(have)}: {advice}")
