"""The pure functions a training run jits: one optimizer update, and the loss of a batch; float16's dynamic loss
scaling, as torch.cuda.amp.GradScaler (nanoGPT's) does it."""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .model import cross_entropy

# torch.cuda.amp.GradScaler's defaults: nanoGPT builds it with none of its own
INITIAL_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState  # a float16 run's is a ScaledState


class LossScale(NamedTuple):
    scale: jax.Array  # float32 scalar, a power of two: the loss is multiplied by it before the backward pass
    good_steps: jax.Array  # int32 scalar: finite steps in a row since the scale last changed (GradScaler's tracker)


class ScaledState(NamedTuple):
    """A float16 run's optimizer state: the optimizer's own and the loss scale, so that checkpoints hold both."""

    inner: optax.OptState
    loss_scale: LossScale


def initial_loss_scale() -> LossScale:
    return LossScale(jnp.float32(INITIAL_SCALE), jnp.int32(0))


def with_loss_scale(init):
    """An optimizer's `init` for a float16 run: its state and a fresh loss scale."""
    return lambda params: ScaledState(init(params), initial_loss_scale())


def next_loss_scale(ls: LossScale, finite, growth_interval: int = GROWTH_INTERVAL) -> LossScale:
    """GradScaler.update: halved (and the count restarted) after a step with inf/NaN gradients, doubled after
    `growth_interval` finite steps in a row unless that overflows float32."""
    good = ls.good_steps + 1
    grow = good == growth_interval
    grown = jnp.where(jnp.isfinite(ls.scale * GROWTH_FACTOR), ls.scale * GROWTH_FACTOR, ls.scale)
    scale = jnp.where(finite, jnp.where(grow, grown, ls.scale), ls.scale * BACKOFF_FACTOR)
    return LossScale(scale, jnp.where(finite & ~grow, good, 0).astype(jnp.int32))


def loss_fn(params, model, x_BT, y_BT, key):
    """Mean cross-entropy of the model on (x, y); `key` None means dropout off."""
    deterministic = key is None
    logits_BTV, _ = model.apply({"params": params}, x_BT, deterministic=deterministic,
                                rngs=None if deterministic else {"dropout": key})
    return cross_entropy(logits_BTV, y_BT)


def _scaled_loss_fn(params, scale, *args):
    """(loss * scale, loss): its gradient is the scaled one, the loss comes back as it is."""
    loss = loss_fn(params, *args)
    return loss * scale, loss


def accumulate_grads(params, batch, key, loss_scale=None, *, model):
    """(mean loss, mean gradients) over a batch (x, y) of shape (A, B, T): A micro-batches in a scan. With a
    `loss_scale` (float16) the gradients are those of the loss times it, as GradScaler's scale(loss).backward()."""
    x_ABT, y_ABT = batch
    A = x_ABT.shape[0]
    train = model.config.dropout > 0.0

    def micro_step(grads, xs):
        x_BT, y_BT, k = xs
        args = (model, x_BT, y_BT, k if train else None)
        if loss_scale is None:
            loss, g = jax.value_and_grad(loss_fn)(params, *args)
        else:
            (_, loss), g = jax.value_and_grad(_scaled_loss_fn, has_aux=True)(params, loss_scale, *args)
        return jax.tree.map(jnp.add, grads, g), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, losses = jax.lax.scan(micro_step, zeros, (x_ABT, y_ABT, jax.random.split(key, A)))
    return jnp.mean(losses), jax.tree.map(lambda g: g / A, grads)


def train_step(state: TrainState, batch, key, *, model, tx, grads_fn=None, skip_nonfinite: bool = False):
    """One optimizer update from a batch (x, y) of shape (A, B, T). `grads_fn(params, batch, key, loss_scale)`
    computes (loss, grads); parallel.py wraps accumulate_grads so that each device works on its own rows.

    Returns (state, loss); with skip_nonfinite, (state, (loss, skipped)): a step whose loss or gradient norm
    is NaN or inf keeps the old state (params and optimizer state) and `skipped` is 1, else 0 (int32). A float16
    state (ScaledState) goes through _scaled_step."""
    grads_fn = grads_fn or partial(accumulate_grads, model=model)
    if isinstance(state.opt_state, ScaledState):
        return _scaled_step(state, batch, key, tx=tx, grads_fn=grads_fn, skip_nonfinite=skip_nonfinite)
    loss, grads = grads_fn(state.params, batch, key, None)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(optax.apply_updates(state.params, updates), opt_state)
    if not skip_nonfinite:
        return new_state, loss
    ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    return new_state, (loss, jnp.where(ok, 0, 1).astype(jnp.int32))


def _scaled_step(state: TrainState, batch, key, *, tx, grads_fn, skip_nonfinite: bool):
    """nanoGPT's float16 step: scale(loss).backward() per micro-batch, unscale_ once the gradients are reduced
    over the devices (so that clipping sees the true ones), step() only if every element of every shard is
    finite (under jit the gradients are global arrays; under pmap each device holds the same reduced ones), then
    update() the scale. skip_nonfinite also drops a step whose loss is NaN or inf (the scale follows the
    gradients alone, as GradScaler's) and counts every dropped step, the scaler's included."""
    ls = state.opt_state.loss_scale
    loss, scaled_grads = grads_fn(state.params, batch, key, ls.scale)
    grads = jax.tree.map(lambda g: g * (1.0 / ls.scale), scaled_grads)  # GradScaler multiplies by the inverse
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, inner = tx.update(grads, state.opt_state.inner, state.params)
    ok = finite & jnp.isfinite(loss) if skip_nonfinite else finite
    params, inner = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                 (optax.apply_updates(state.params, updates), inner),
                                 (state.params, state.opt_state.inner))
    new_state = TrainState(params, ScaledState(inner, next_loss_scale(ls, finite)))
    return (new_state, (loss, jnp.where(ok, 0, 1).astype(jnp.int32))) if skip_nonfinite else (new_state, loss)


def eval_step(params, batch, *, model):
    """Mean loss over a batch (x, y) of shape (B, T), dropout off."""
    return loss_fn(params, model, *batch, None)
