"""The jitted step's pure functions: micro-batch accumulation is one big batch, bfloat16 compute keeps float32
parameters, and the reported losses are the plain mean cross-entropy recomputed in numpy."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax
from nanogpt_jax.config import TrainConfig
from nanogpt_jax.model import GPTConfig, init_params, make_model
from nanogpt_jax.optim import OptimConfig, make_optimizer
from nanogpt_jax.step import TrainState, eval_step, train_step


def numpy_loss(model, params, x, y):
    """Mean token cross-entropy of the model's logits on (x, y), computed in float64 numpy."""
    logp = np_log_softmax(model.apply({"params": params}, jnp.asarray(x))[0])
    return -np.take_along_axis(logp, np.asarray(y)[..., None], -1).mean()


@pytest.mark.slow
def test_micro_batches_equal_one_big_batch():
    """(k, b, T) micro-batches give the updates and loss of one (1, k*b, T) batch; the loss is numpy's."""
    k, b, T = 4, 2, 16
    config = GPTConfig(block_size=T, vocab_size=65, n_layer=1, n_head=2, n_embd=32, bias=False)
    model = make_model(config)
    cfg = TrainConfig(learning_rate=1e-3, decay_lr=False, weight_decay=0.1, grad_clip=1.0)
    tx = make_optimizer(OptimConfig.of(cfg))
    params = init_params(config, jax.random.PRNGKey(0))
    win = np.random.default_rng(0).integers(0, 65, (k * b, T + 1)).astype(np.int32)
    x, y = win[:, :-1], win[:, 1:]
    step = jax.jit(partial(train_step, model=model, tx=tx))
    key = jax.random.PRNGKey(1)
    results = []
    for shape in [(k, b, T), (1, k * b, T)]:
        state = TrainState(params, tx.init(params))
        for _ in range(2):
            state, loss = step(state, (jnp.asarray(x.reshape(shape)), jnp.asarray(y.reshape(shape))), key)
        results.append((state, float(loss)))
    (s_small, l_small), (s_big, l_big) = results
    np.testing.assert_allclose(l_small, l_big, rtol=1e-5)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-6),
                 s_small.params, s_big.params)
    # and the loss is the plain mean cross-entropy of the updated params on all k*b rows, recomputed in numpy
    ref = numpy_loss(model, s_big.params, x, y)
    _, loss_after = step(state, (jnp.asarray(x.reshape(k, b, T)), jnp.asarray(y.reshape(k, b, T))), key)
    np.testing.assert_allclose(float(loss_after), ref, rtol=1e-5)


def test_eval_step_is_the_mean_cross_entropy():
    """eval_step: dropout off (even for a dropout model), mean cross-entropy over the batch, as numpy's."""
    config = GPTConfig(block_size=8, vocab_size=13, n_layer=1, n_head=2, n_embd=16, dropout=0.5)
    model = make_model(config)
    params = init_params(config, jax.random.PRNGKey(0))
    win = np.random.default_rng(1).integers(0, 13, (3, 9)).astype(np.int32)
    x, y = win[:, :-1], win[:, 1:]
    loss = jax.jit(partial(eval_step, model=model))(params, (jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(float(loss), numpy_loss(model, params, x, y), rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    """--dtype=bfloat16: activations in bf16, parameters, gradients and optimizer state in float32."""
    cfg = TrainConfig(learning_rate=1e-3, warmup_iters=0, lr_decay_iters=10)
    tx = make_optimizer(OptimConfig.of(cfg))
    x = jax.random.randint(jax.random.PRNGKey(1), (1, 4, 16), 0, 65)
    y = jnp.roll(x, -1, axis=-1)
    out = {}
    for dtype in ("float32", "bfloat16"):
        config = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dtype=dtype)
        params = init_params(config, jax.random.PRNGKey(0))
        step = jax.jit(partial(train_step, model=make_model(config), tx=tx))
        state, loss = step(TrainState(params, tx.init(params)), (x, y), jax.random.PRNGKey(2))
        assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
        assert {leaf.dtype for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim} == {jnp.dtype(jnp.float32)}
        out[dtype] = float(loss)
    assert out["bfloat16"] == pytest.approx(out["float32"], abs=0.02)  # bf16 keeps ~3 significant digits
    assert out["bfloat16"] != out["float32"]  # and really computed in bf16
