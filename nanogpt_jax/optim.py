"""nanoGPT's optimizer: AdamW with its warmup + cosine learning-rate schedule, decay on matrices only,
and global-norm gradient clipping."""

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax



@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer's options, by nanoGPT's names (TrainConfig holds their defaults)."""

    learning_rate: float
    min_lr: float
    warmup_iters: int
    lr_decay_iters: int
    decay_lr: bool
    beta1: float
    beta2: float
    weight_decay: float
    grad_clip: float

    @classmethod
    def of(cls, cfg) -> "OptimConfig":
        """The options a training config (or any object with these names) gives."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def get_lr(it, cfg: OptimConfig):
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr. A Python int
    (the log line's) is computed on the host in float64, as nanoGPT does, not by a dozen device ops per step."""
    xp = np if isinstance(it, int | np.integer) else jnp
    if not cfg.decay_lr:
        return cfg.learning_rate + 0.0 * it
    warm = cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    ratio = xp.clip((it - cfg.warmup_iters) / max(cfg.lr_decay_iters - cfg.warmup_iters, 1), 0.0, 1.0)
    cosine = cfg.min_lr + 0.5 * (1.0 + xp.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
    return xp.where(it < cfg.warmup_iters, warm, xp.where(it > cfg.lr_decay_iters, cfg.min_lr, cosine))


def decay_mask(params):
    """Weight decay on matmul and embedding weights only: nanoGPT's "2-D or more" rule, stated by name so
    that it stays true if layers are ever stacked (a stacked bias is 2-D)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(partial(get_lr, cfg=cfg), b1=cfg.beta1, b2=cfg.beta2,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    # Clipping sits before AdamW so it sees the gradient averaged over micro-batches (and devices); the
    # chain keeps one structure with or without it, so a run resumes under another --grad_clip.
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)
