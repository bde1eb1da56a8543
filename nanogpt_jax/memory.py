"""The memory a model needs, estimated from its config before anything is built, against what this machine has:
an absurd size (a million layers, a billion positions, a billion new tokens) is refused in one line instead of
allocating until the machine dies. Estimates are rough lower bounds (what must be held, not what XLA adds), so
that a run they refuse cannot fit, and a run that fits is never refused."""

import dataclasses
import os

import jax
import jax.numpy as jnp

from .config import UserError
from .model import DTYPES, GPTConfig

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
    per layer about 17 values per token and channel plus the attention probabilities (remat "full": one
    layer's, and each layer's input; "dots": each layer's 9 matmul outputs per channel, and one layer's), and
    the float32 logits with their gradient."""
    T, C, N = config.block_size, config.n_embd, config.n_head
    logits = 2 * 4 * rows * T * config.vocab_size
    if not config.has_attention:
        return logits
    size = jnp.dtype(DTYPES[config.dtype]).itemsize
    per_layer = rows * T * (17 * C + N * T) * size
    kept = {"none": per_layer * config.n_layer, "full": per_layer + rows * T * C * size * config.n_layer,
            "dots": per_layer + rows * T * 9 * C * size * config.n_layer}[config.remat]
    return logits + kept


def remat_saves_memory(scan_layers: bool, platform: str | None = None) -> bool:
    """With the layers unrolled, XLA:CPU drops the optimization barriers that jax.checkpoint puts around a
    block, and common-subexpression elimination then merges the recomputed forward pass into the saved one:
    on a CPU remat then keeps every layer's activations. A scanned layer loop keeps them apart
    (tests/test_memory.py checks both against the compiled step)."""
    return scan_layers or (platform or jax.default_backend()) != "cpu"


def training_bytes(config: GPTConfig, rows: int, fsdp: int, steps: int = 1) -> int:
    """One device's memory for a training step, `rows` windows per micro-batch on that device, `steps`
    micro-batches: the float32 params and AdamW's two moments (split fsdp ways), the gradient accumulator and
    the micro-batch's gradient (whole with data parallelism; split under FSDP, which holds whole only the
    embeddings and ln_f and one layer's weights at a time, with their gradients), and the activations."""
    n, per_layer = param_count(config), param_count(dataclasses.replace(config, n_layer=1)) - param_count(
        dataclasses.replace(config, n_layer=0))
    grads = (2 if steps > 1 else 1) * 4 * n
    if fsdp > 1:
        outside = n - per_layer * config.n_layer
        grads = grads // fsdp + 2 * 4 * (outside + per_layer)
    return 12 * n // fsdp + grads + activation_bytes(config, rows)


def generate_bytes(config: GPTConfig, batch: int, columns: int) -> int:
    """`generate` for `batch` rows of `columns` tokens (prompt and new): the float32 params, the KV cache (up to
    block_size columns), the token ids on the device, and again on the host as an array and as Python lists
    for decoding."""
    head = config.n_embd if config.has_attention else 0
    cache = 2 * config.n_layer * batch * min(columns, config.block_size) * head * jnp.dtype(
        DTYPES[config.dtype]).itemsize
    return 4 * param_count(config) + cache + batch * columns * (4 + 4 + 8)


def host_bytes() -> int:
    """Physical memory of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_bytes() -> int:
    """Memory of this process's accelerators, summed (their memory_stats' limit); the host's memory when they
    report none (CPU devices share the host's)."""
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
    return sum(limits) if limits and all(limits) else host_bytes()


def per_device_bytes() -> int:
    """One device's share: its memory_stats' limit, or the host's memory over its CPU devices."""
    return device_bytes() // len(jax.local_devices())


def gib(n: int, digits: int = 1) -> str:
    return f"{n / 2**30:,.{digits}f} GiB"


def refuse_unless_it_fits(need: int, what: str, advice: str, per_device: bool = False) -> None:
    """One line with both figures when `need` bytes (over all processes; or, per_device, on each device)
    exceed the memory of the run's devices."""
    have = per_device_bytes() if per_device else device_bytes() * jax.process_count()
    if need > have:
        where = "each device has" if per_device else "this machine has"
        raise OutOfMemoryError(f"{what} needs about {gib(need)}{' per device' if per_device else ''} of memory and "
                               f"{where} {gib(have)}: {advice}")
