"""The optimizer against nanoGPT: its lr schedule written out, a numpy AdamW with torch.optim.AdamW's semantics,
nanoGPT's weight-decay rule (dim >= 2) and decoupled weight decay."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import nanogpt_get_lr
from nanogpt_jax.config import TrainConfig
from nanogpt_jax.model import GPTConfig, init_params, unstack_layers
from nanogpt_jax.optim import OptimConfig, decay_mask, get_lr, make_optimizer


@pytest.mark.parametrize("sched", [(1e-3, 10, 100, 1e-4), (6e-4, 20, 60, 6e-5), (1e-2, 0, 30, 0.0)])
def test_lr_schedule_equals_nanogpt(sched):
    """get_lr equals nanoGPT's get_lr at every iteration, called with Python ints and traced int32."""
    lr, warmup, decay, min_lr = sched
    cfg = OptimConfig.of(TrainConfig(learning_rate=lr, warmup_iters=warmup, lr_decay_iters=decay, min_lr=min_lr))
    steps = np.arange(decay + 51)
    ref = np.array([nanogpt_get_lr(int(i), lr, warmup, decay, min_lr) for i in steps])
    # float32 arithmetic: with min_lr = 0 the last cosine steps approach 0 and lose relative precision,
    # so the absolute slack is 1e-7 of the peak lr (with min_lr > 0 rtol alone decides)
    atol = 1e-7 * lr if min_lr == 0 else 0.0
    ours = np.array([float(get_lr(int(i), cfg)) for i in steps])  # python ints, as the loop logs it
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=atol)
    traced = np.asarray(jax.jit(jax.vmap(partial(get_lr, cfg=cfg)))(jnp.asarray(steps, jnp.int32)))
    np.testing.assert_allclose(traced, ref, rtol=1e-6, atol=atol)  # int32 counts, as optax calls it


def test_lr_constant_without_decay():
    """decay_lr=False: learning_rate at every iteration, warmup ignored, as nanoGPT."""
    cfg = OptimConfig.of(TrainConfig(learning_rate=3e-4, decay_lr=False, warmup_iters=10, lr_decay_iters=50,
                                     min_lr=1e-5))
    np.testing.assert_allclose([float(get_lr(i, cfg)) for i in range(100)], 3e-4, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(jax.vmap(partial(get_lr, cfg=cfg))(jnp.arange(100))), 3e-4, rtol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# AdamW, clipping, weight-decay mask


def torch_adamw_reference(params, grad_seq, lrs, beta1, beta2, weight_decay, grad_clip, decay, eps=1e-8):
    """torch.optim.AdamW (as nanoGPT configures it) + torch.nn.utils.clip_grad_norm_, in float64 numpy.
    `decay` maps each leaf to True (decayed group) or False (no-decay group)."""
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    out = []
    for t, (grads, lr) in enumerate(zip(grad_seq, lrs, strict=True), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        if grad_clip > 0:
            total_norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
            clip_coef = min(grad_clip / (total_norm + 1e-6), 1.0)
            g = {k: x * clip_coef for k, x in g.items()}
        for k in p:
            if decay[k]:
                p[k] *= 1 - lr * weight_decay
            m[k] = beta1 * m[k] + (1 - beta1) * g[k]
            v2[k] = beta2 * v2[k] + (1 - beta2) * g[k] ** 2
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
            denom = np.sqrt(v2[k]) / math.sqrt(bc2) + eps
            p[k] -= lr / bc1 * m[k] / denom
        out.append({k: x.copy() for k, x in p.items()})
    return out


def flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_optimizer_equals_torch_adamw(grad_clip):
    """Four updates equal torch.optim.AdamW + clip_grad_norm_ (float64 numpy) with nanoGPT's groups."""
    cfg = TrainConfig(learning_rate=1e-2, warmup_iters=2, lr_decay_iters=6, min_lr=1e-3, weight_decay=0.1,
                      beta1=0.9, beta2=0.95, grad_clip=grad_clip)
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, bias=True)
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    n_steps = 4
    per_layer = unstack_layers  # the reference sees nanoGPT's tensors: one per layer, a bias 1-D
    # gradients big enough that clipping acts on some steps and not on others
    scales = [3.0, 0.001, 1.0, 0.02]
    grad_seq = [jax.tree.map(lambda x, s=s: (s * rng.standard_normal(x.shape)).astype(np.float32), params)
                for s in scales]
    lrs = [nanogpt_get_lr(i, 1e-2, 2, 6, 1e-3) for i in range(n_steps)]
    # nanoGPT's configure_optimizers: parameters with dim >= 2 are decayed, the others not
    decay = {k: x.ndim >= 2 for k, x in flat(per_layer(params)).items()}
    ref = torch_adamw_reference(flat(per_layer(params)), [flat(per_layer(g)) for g in grad_seq], lrs, 0.9, 0.95, 0.1,
                                grad_clip, decay)

    tx = make_optimizer(OptimConfig.of(cfg))
    state, p = tx.init(params), params
    update = jax.jit(tx.update)
    for t in range(n_steps):
        updates, state = update(grad_seq[t], state, p)
        p = optax.apply_updates(p, updates)
        for k, x in flat(per_layer(p)).items():
            np.testing.assert_allclose(x, ref[t][k], rtol=2e-5, atol=1e-7, err_msg=f"step {t} {k}")


def test_first_adam_step_size_is_the_scheduled_lr():
    """Adam's first step is lr * g / (|g| + eps): for |g| >> eps, exactly lr * sign(g), lr = get_lr(0)."""
    cfg = TrainConfig(learning_rate=6e-4, warmup_iters=9, lr_decay_iters=100, min_lr=6e-5, weight_decay=0.0,
                      grad_clip=0.0)
    params = {"w": {"kernel": jnp.zeros((4, 5))}}
    g = np.random.default_rng(1).choice([-1.0, 1.0], (4, 5)) * np.random.default_rng(2).uniform(0.1, 5, (4, 5))
    tx = make_optimizer(OptimConfig.of(cfg))
    updates, _ = tx.update({"w": {"kernel": jnp.asarray(g, jnp.float32)}}, tx.init(params), params)
    expected_lr = 6e-4 * 1 / 10  # nanoGPT warmup at it=0: learning_rate * (0 + 1) / (warmup_iters + 1)
    np.testing.assert_allclose(np.asarray(updates["w"]["kernel"]), -expected_lr * np.sign(g), rtol=1e-6)


def test_decay_mask_is_nanogpts_dim_rule():
    """Decay exactly the tensors nanoGPT decays (dim >= 2), named by leaf so stacking cannot change it."""
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8, bias=True)
    params = init_params(config, jax.random.PRNGKey(0))
    mask = flat(decay_mask(params))
    shapes = flat(params)
    assert mask.keys() == shapes.keys()
    for k, decayed in mask.items():
        ndim = shapes[k].ndim - k.startswith("['h']")  # one layer's tensor, as nanoGPT holds it
        assert bool(decayed) == (ndim >= 2), k  # nanoGPT: decay exactly the >= 2-D tensors
        named = any(f"['{n}']" in k for n in ("wte", "wpe", "c_attn", "c_proj", "c_fc"))
        assert bool(decayed) == (named and (k.endswith("['kernel']") or k.endswith("['embedding']"))), k
    assert sum(mask.values()) == 2 + 4  # wte, wpe, and the stacked c_attn, attn.c_proj, c_fc, mlp.c_proj
    # stacked (scanned) layers make biases 2-D: the mask goes by name, not by ndim
    stacked = {"h": {"ln_1": {"scale": jnp.ones((2, 8))}, "c_fc": {"bias": jnp.zeros((2, 8)),
                                                                    "kernel": jnp.ones((2, 8, 8))}}}
    assert flat(decay_mask(stacked)) == {"['h']['c_fc']['bias']": False, "['h']['c_fc']['kernel']": True,
                                         "['h']['ln_1']['scale']": False}


@pytest.mark.slow
def test_weight_decay_applies_to_kernels_not_biases():
    """A zero gradient moves matrices by p * (1 - lr * wd) and leaves biases and LayerNorms alone."""
    cfg = TrainConfig(learning_rate=1e-2, decay_lr=False, weight_decay=0.1, grad_clip=1.0)
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, bias=True)
    params = jax.tree.map(lambda x: x + 0.5, init_params(config, jax.random.PRNGKey(0)))  # nonzero biases
    tx = make_optimizer(OptimConfig.of(cfg))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = flat(optax.apply_updates(params, updates))
    for k, x in flat(params).items():
        matrix = x.ndim - k.startswith("['h']") >= 2  # one layer's tensor, as nanoGPT holds it
        # a zero gradient leaves Adam's step at 0: only decoupled decay, p * (1 - lr * wd), moves a weight
        expected = x * (1 - 1e-2 * 0.1) if matrix else x
        np.testing.assert_allclose(new[k], expected, rtol=1e-6, err_msg=k)
        if not matrix:
            np.testing.assert_array_equal(new[k], x)
