"""The pure functions a training run jits: one optimizer update, and the loss of a batch."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .model import cross_entropy


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState


def loss_fn(params, model, x_BT, y_BT, key):
    """Mean cross-entropy of the model on (x, y); `key` None means dropout off."""
    deterministic = key is None
    logits_BTV, _ = model.apply({"params": params}, x_BT, deterministic=deterministic,
                                rngs=None if deterministic else {"dropout": key})
    return cross_entropy(logits_BTV, y_BT)


def accumulate_grads(params, batch, key, *, model):
    """(mean loss, mean gradients) over a batch (x, y) of shape (A, B, T): A micro-batches in a scan."""
    x_ABT, y_ABT = batch
    A = x_ABT.shape[0]
    train = model.config.dropout > 0.0

    def micro_step(grads, xs):
        x_BT, y_BT, k = xs
        loss, g = jax.value_and_grad(loss_fn)(params, model, x_BT, y_BT, k if train else None)
        return jax.tree.map(jnp.add, grads, g), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, losses = jax.lax.scan(micro_step, zeros, (x_ABT, y_ABT, jax.random.split(key, A)))
    return jnp.mean(losses), jax.tree.map(lambda g: g / A, grads)


def train_step(state: TrainState, batch, key, *, model, tx, grads_fn=None, skip_nonfinite: bool = False):
    """One optimizer update from a batch (x, y) of shape (A, B, T). `grads_fn(params, batch, key)` computes
    (loss, grads); parallel.py wraps accumulate_grads so that each device works on its own rows.

    Returns (state, loss); with skip_nonfinite, (state, (loss, skipped)): a step whose loss or gradient norm
    is NaN or inf keeps the old state (params and optimizer state) and `skipped` is 1, else 0 (int32)."""
    grads_fn = grads_fn or (lambda params, batch, key: accumulate_grads(params, batch, key, model=model))
    loss, grads = grads_fn(state.params, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(optax.apply_updates(state.params, updates), opt_state)
    if not skip_nonfinite:
        return new_state, loss
    ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    return new_state, (loss, jnp.where(ok, 0, 1).astype(jnp.int32))


def eval_step(params, batch, *, model):
    """Mean loss over a batch (x, y) of shape (B, T), dropout off."""
    return loss_fn(params, model, *batch, None)
