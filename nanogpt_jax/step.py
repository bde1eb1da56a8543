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


def train_step(state: TrainState, batch, key, *, model, tx):
    """One optimizer update from a batch (x, y) of shape (A, B, T): A micro-batches, gradients averaged."""
    x_ABT, y_ABT = batch
    A = x_ABT.shape[0]
    train = model.config.dropout > 0.0

    def micro_step(grads, xs):
        x_BT, y_BT, k = xs
        loss, g = jax.value_and_grad(loss_fn)(state.params, model, x_BT, y_BT, k if train else None)
        return jax.tree.map(jnp.add, grads, g), loss

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, losses = jax.lax.scan(micro_step, zeros, (x_ABT, y_ABT, jax.random.split(key, A)))
    grads = jax.tree.map(lambda g: g / A, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), jnp.mean(losses)


def eval_step(params, batch, *, model):
    """Mean loss over a batch (x, y) of shape (B, T), dropout off."""
    return loss_fn(params, model, *batch, None)
