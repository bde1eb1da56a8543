"""The backward pass against independent references: the whole loss's gradient (blocked causal attention past
128 tokens, the one-hot cross-entropy with its stop_gradient and ignored targets, the tied lm_head) against
torch autograd through transformers' GPT-2 on the same weights; the dropout attention path, which no torch
model can reproduce draw for draw, against central finite differences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_gpt2
from nanogpt_jax.kernels import ATTENTION_BLOCK
from nanogpt_jax.model import make_model
from nanogpt_jax.pretrained import from_pretrained, hf_layout
from nanogpt_jax.step import loss_fn

T = 2 * ATTENTION_BLOCK + 20  # three query blocks, the last one short


@pytest.fixture(scope="module")
def hf_long(tmp_path_factory):
    model = hf_gpt2(n_positions=T + 1, initializer_range=0.1)
    folder = tmp_path_factory.mktemp("hf_long")
    model.save_pretrained(folder)
    return model, from_pretrained(str(folder))


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_loss_gradient_equals_torch_autograd(hf_long, scan_layers):
    import torch

    hf, (config, params) = hf_long
    config = dataclasses.replace(config, scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (2, T + 1))
    targets = idx[:, 1:].copy()
    targets[0, :7] = -1  # ignored, as nanoGPT's ignore_index=-1
    loss, grads = jax.value_and_grad(loss_fn)(params, make_model(config), jnp.asarray(idx[:, :-1], jnp.int32),
                                              jnp.asarray(targets, jnp.int32), None)
    hf.zero_grad()
    logits = hf(torch.from_numpy(idx[:, :-1])).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1),
                                            ignore_index=-1)
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    torch_grads = {name.removeprefix("transformer."): p.grad.numpy() for name, p in hf.named_parameters()}
    leaves = {tuple(k.key for k in kp): np.asarray(x) for kp, x in jax.tree_util.tree_flatten_with_path(grads)[0]}
    for name, (path, layer, _) in hf_layout(config).items():
        ours = leaves[path] if layer is None else leaves[path][layer]
        scale = np.abs(torch_grads[name]).max()
        np.testing.assert_allclose(ours, torch_grads[name], atol=2e-5 * scale + 1e-9, rtol=1e-3, err_msg=name)


@pytest.mark.slow
def test_dropout_attention_gradient_equals_finite_differences(hf_long):
    """With one dropout key the loss is a smooth function of the weights: its directional derivative along a
    random direction equals the central difference of the loss itself."""
    _, (config, params) = hf_long
    config = dataclasses.replace(config, dropout=0.2, block_size=64)
    params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][:64]}}
    model, key = make_model(config), jax.random.PRNGKey(3)
    idx = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 65)), jnp.int32)

    def loss(p):
        return loss_fn(p, model, idx[:, :-1], idx[:, 1:], key)

    grads = jax.grad(loss)(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(2)
    direction = jax.tree_util.tree_unflatten(treedef, [rng.standard_normal(x.shape).astype(np.float32) for x in leaves])
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-3
    shifted = [jax.tree.map(lambda x, d, s=s: x + s * eps * d, params, direction) for s in (1, -1)]
    numeric = (float(loss(shifted[0])) - float(loss(shifted[1]))) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=2e-2), (numeric, analytic)
