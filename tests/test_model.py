"""The GPT / bigram models against independent references: a float64 numpy forward pass written from nanoGPT's
model.py, nanoGPT's parameter count as a closed-form formula and its published figures, GPT-2's init, causality
checked by gradients and by perturbing later tokens."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, nanogpt_num_params, np_log_softmax
from nanogpt_jax import model as model_module
from nanogpt_jax.kernels import ATTENTION_BLOCK, Dropout, keep_mask
from nanogpt_jax.model import (GPTConfig, crop_block_size, cross_entropy, init_cache, init_params,
                               make_model, num_params)
from nanogpt_jax.step import loss_fn

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, bias=True)
# Long enough for attention in blocks of query rows, the last block shorter than the others.
LONG = dataclasses.replace(TINY, block_size=2 * ATTENTION_BLOCK + 44)


def perturbed_params(config, seed=0):
    """Fresh params with LayerNorm scales/biases and Linear biases moved off (1, 0), so a swap would show."""
    params = init_params(config, jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [x + 0.1 * rng.standard_normal(x.shape).astype(np.float32) if x.ndim == 1 else x for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def tokens(config, B=2, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (B, config.block_size)).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# forward pass against a float64 numpy transcription of nanoGPT's GPT.forward


def np_forward(config, params, idx):
    """nanoGPT's GPT forward in float64 numpy (GELU in GPT-2's tanh form, `gelu_new` of the released model)."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    C, nh = config.n_embd, config.n_head
    hs = C // nh
    B, T = idx.shape

    def ln(x, d):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * d["scale"] + d.get("bias", 0.0)

    def linear(x, d):
        return x @ d["kernel"] + d.get("bias", 0.0)

    def gelu(x):
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

    x = p["wte"]["embedding"][idx] + p["wpe"]["embedding"][np.arange(T)][None]
    for i in range(config.n_layer):
        blk = jax.tree.map(lambda a, i=i: np.asarray(a)[i], p["h"])  # the stacked blocks' layer i
        h = ln(x, blk["ln_1"])
        q, k, v = np.split(linear(h, blk["attn"]["c_attn"]), 3, axis=-1)
        q, k, v = (t.reshape(B, T, nh, hs).transpose(0, 2, 1, 3) for t in (q, k, v))
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)
        att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + linear(y, blk["attn"]["c_proj"])
        x = x + linear(gelu(linear(ln(x, blk["ln_2"]), blk["mlp"]["c_fc"])), blk["mlp"]["c_proj"])
    x = ln(x, p["ln_f"])
    return x @ p["wte"]["embedding"].T


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("base", [TINY, LONG], ids=["short", "blocked-attention"])
def test_forward_matches_numpy_reference(bias, base):
    config = dataclasses.replace(base, bias=bias)
    params = perturbed_params(config)
    idx = tokens(config)
    logits, cache = make_model(config).apply({"params": params}, jnp.asarray(idx))
    assert cache is None and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np_forward(config, params, idx), rtol=1e-4, atol=1e-5)
    # logits_at gives one position's logits of the full pass
    last, _ = make_model(config).apply({"params": params}, jnp.asarray(idx), logits_at=idx.shape[1] - 1)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np_forward(config, params, idx)[:, -1], rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 1e-9], ids=["causal", "dropout-path"])
def test_bfloat16_forward_and_gradient_follow_the_float64_reference(dropout):
    """bfloat16 compute (the default off a CPU), in query blocks without and with dropout: the attention scores
    accumulate in float32 (BF16_BF16_F32), so the loss follows nanoGPT's float64 forward and the gradients
    the float32 model's, to bfloat16's precision."""
    base = dataclasses.replace(LONG, dropout=dropout)
    params = perturbed_params(base)
    idx = tokens(base)
    targets = np.roll(idx, -1, axis=1)

    def loss(dtype, p):
        logits, _ = make_model(dataclasses.replace(base, dtype=dtype)).apply(
            {"params": p}, jnp.asarray(idx), deterministic=dropout == 0.0, rngs={"dropout": jax.random.PRNGKey(3)})
        return cross_entropy(logits, jnp.asarray(targets))

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)("bfloat16", params)
    _, ref_grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)("float32", params)
    ref = np.mean(-np.take_along_axis(np_log_softmax(np_forward(base, params, idx)), targets[..., None], -1))
    assert abs(float(value) - ref) < 2e-2 * ref
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert got.dtype == jnp.float32
        assert np.linalg.norm(np.asarray(got) - want) <= 5e-2 * np.linalg.norm(want)


def test_manual_dropout_attention_matches_reference_when_nothing_is_dropped():
    """The attention used while training with dropout: with a dropout rate so small that the keep probability
    rounds to 1 (keep_mask), the training-mode forward must be nanoGPT's forward."""
    config = dataclasses.replace(TINY, dropout=1e-9)
    params = perturbed_params(config)
    idx = tokens(config)
    logits, _ = make_model(config).apply({"params": params}, jnp.asarray(idx), deterministic=False,
                                         rngs={"dropout": jax.random.PRNGKey(3)})
    np.testing.assert_allclose(np.asarray(logits), np_forward(config, params, idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rate,shape", [(0.2, (3, 5, 7)), (0.1, (4, 256)), (0.5, (1,)), (1e-9, (9,))])
def test_keep_mask_is_16_random_bits_per_element_against_the_keep_probability(rate, shape):
    """keep_mask recomputed in numpy from the same key's 32-bit words: their low then high 16 bits, element after
    element, each kept when below round((1 - rate) * 65536)."""
    key = jax.random.PRNGKey(11)
    n = math.prod(shape)
    words = np.asarray(jax.random.bits(key, ((n + 1) // 2,), jnp.uint32))
    halves = np.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1)[:n]
    want = (halves < round((1 - rate) * 65536)).reshape(shape)
    np.testing.assert_array_equal(np.asarray(keep_mask(key, rate, shape)), want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_drops_the_rate_scales_the_rest_and_draws_pairs_independently(dtype):
    """Over 2**20 ones at rate 0.2: the dropped fraction, and both elements of one 32-bit word dropped together,
    within 5 sigma of 0.2 and 0.04; the kept ones are 1 / 0.8 in the input's dtype; off in evaluation."""
    x = jnp.ones((2**10, 2**10), dtype)
    y = Dropout(0.2).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
    out = np.asarray(y, np.float32)
    dropped = out == 0
    both = dropped.reshape(-1, 2).all(axis=1)
    for seen, p in ((dropped, 0.2), (both, 0.04)):
        assert abs(seen.mean() - p) < 5 * math.sqrt(p * (1 - p) / seen.size)
    np.testing.assert_array_equal(out[~dropped], np.float32(jnp.asarray(1 / 0.8, dtype)))
    assert y.dtype == dtype
    assert Dropout(0.2).apply({}, x, True) is x


@pytest.mark.slow
def test_dropout_changes_training_forward_only():
    config = dataclasses.replace(TINY, dropout=0.2)
    params = perturbed_params(config)
    idx = jnp.asarray(tokens(config))
    model = make_model(config)
    eval_logits, _ = model.apply({"params": params}, idx)
    np.testing.assert_allclose(np.asarray(eval_logits), np_forward(config, params, np.asarray(idx)),
                               rtol=1e-4, atol=1e-5)
    a, _ = model.apply({"params": params}, idx, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    b, _ = model.apply({"params": params}, idx, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    c, _ = model.apply({"params": params}, idx, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same key, same masks
    assert np.abs(np.asarray(a) - np.asarray(eval_logits)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_a_sequence_longer_than_block_size_is_refused():
    """block_size + 1 tokens, or a cached call reaching past block_size, is a ValueError naming block_size (wpe
    has no row for it: JAX would clamp the index and return wrong logits silently); block_size tokens run."""
    params = perturbed_params(TINY)
    model = make_model(TINY)
    idx = tokens(TINY, B=1)
    longer = np.concatenate([idx, idx[:, :1]], axis=1)
    with pytest.raises(ValueError, match="cannot run a sequence of 17 tokens: the model has block_size 16 positions"):
        model.apply({"params": params}, jnp.asarray(longer))
    with pytest.raises(ValueError, match="sequence of 18 tokens: the model has block_size 16"):
        model.apply({"params": params}, jnp.asarray(idx[:, :3]), cache=init_cache(TINY, 1), pos=15)
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray(idx))[0]),
                               np_forward(TINY, params, idx), rtol=1e-4, atol=1e-5)


def test_bigram_is_a_table_lookup():
    config = GPTConfig(block_size=8, vocab_size=65, model="bigram")
    params = init_params(config, jax.random.PRNGKey(0))
    table = np.asarray(params["wte"]["embedding"])
    assert table.shape == (65, 65)
    idx = np.random.default_rng(0).integers(0, 65, (3, 8))
    logits, _ = make_model(config).apply({"params": params}, jnp.asarray(idx))
    np.testing.assert_array_equal(np.asarray(logits), table[idx])


# ----------------------------------------------------------------------------------------------------------
# causality


def logits_with_embedding_delta(model, params, idx, delta, **kw):
    """Logits when `delta` (B, T, C) is added to the token embeddings (the output of wte's lookup)."""

    def add_delta(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "wte" and context.method_name == "__call__":
            out = out + delta
        return out

    with nn.intercept_methods(add_delta):
        logits, _ = model.apply({"params": params}, idx, **kw)
    return logits


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_causality_gradient(dropout):
    """d logits[t] / d embedding[s] is exactly zero for every s > t, and not zero for s == t.
    dropout 0: the dot_product_attention path; dropout > 0 with a fixed key: the hand-written path."""
    config = dataclasses.replace(TINY, dropout=dropout)
    params = perturbed_params(config)
    model = make_model(config)
    idx = jnp.asarray(tokens(config, B=1))
    T, C = config.block_size, config.n_embd
    kw = {} if dropout == 0 else dict(deterministic=False, rngs={"dropout": jax.random.PRNGKey(7)})

    def per_position(delta):  # (T,): a scalar function of each position's logits
        logits = logits_with_embedding_delta(model, params, idx, delta, **kw)
        return jnp.sum(logits[0] * jnp.linspace(0.5, 1.5, config.vocab_size), axis=-1)

    jac = np.asarray(jax.jacrev(per_position)(jnp.zeros((1, T, C))))  # (T_out, 1, T_in, C)
    influence = np.abs(jac[:, 0]).sum(-1)  # (T_out, T_in)
    future = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(influence[future] == 0.0), "a later embedding moves an earlier output"
    assert np.all(np.diag(influence) > 0.0)
    assert np.all(influence[~future] > 0.0)  # every earlier position is attended to


@pytest.mark.parametrize("dropout,base", [(0.0, TINY), (0.1, TINY), (0.0, LONG)],
                         ids=["short", "short-dropout", "blocked-attention"])
def test_causality_changing_later_tokens(dropout, base):
    """Replacing the tokens after t leaves logits[:, :t+1] bit-identical (and changes later ones); in blocked
    attention also at the blocks' edges."""
    config = dataclasses.replace(base, dropout=dropout)
    params = perturbed_params(config)
    model = make_model(config)
    kw = {} if dropout == 0 else dict(deterministic=False, rngs={"dropout": jax.random.PRNGKey(7)})
    idx = tokens(config)
    base = np.asarray(model.apply({"params": params}, jnp.asarray(idx), **kw)[0])
    edges = {0, 5, ATTENTION_BLOCK - 1, ATTENTION_BLOCK, config.block_size - 2}
    for t in sorted(e for e in edges if e < config.block_size - 1):
        changed = idx.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + np.arange(config.block_size - t - 1)) % config.vocab_size
        out = np.asarray(model.apply({"params": params}, jnp.asarray(changed), **kw)[0])
        np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 0


# ----------------------------------------------------------------------------------------------------------
# parameter count


def count(config):
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return num_params(shapes), num_params(shapes, non_embedding=False)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(65, 64, 4, 4, 128), (50, 16, 2, 2, 32), (100, 32, 3, 4, 48)])
def test_num_params_equals_nanogpt(shape, bias):
    V, block, L, nh, C = shape
    config = GPTConfig(vocab_size=V, block_size=block, n_layer=L, n_head=nh, n_embd=C, bias=bias)
    assert count(config) == (nanogpt_num_params(V, block, L, C, bias),
                             nanogpt_num_params(V, block, L, C, bias, non_embedding=False))


def test_num_params_published_figures():
    # nanoGPT's README CPU recipe (4 layers, 4 heads, 128 wide, block 64, bias False) prints 0.80M
    cpu, _ = count(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False))
    assert f"{cpu / 1e6:.2f}M" == "0.80M"
    # GPT-2 small: 124,439,808 parameters; nanoGPT prints 123.65M (position embeddings excluded)
    non_emb, total = count(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                                     bias=True))
    assert total == 124_439_808
    assert f"{non_emb / 1e6:.2f}M" == "123.65M"


def test_num_params_bigram():
    config = GPTConfig(vocab_size=65, block_size=8, model="bigram")
    assert count(config) == (65 * 65, 65 * 65)


# ----------------------------------------------------------------------------------------------------------
# GPT-2 initialisation


@pytest.mark.slow
def test_gpt2_init_statistics():
    L, C = 4, 256
    config = GPTConfig(vocab_size=512, block_size=256, n_layer=L, n_head=4, n_embd=C, bias=True)
    p = init_params(config, jax.random.PRNGKey(0))
    proj_std = 0.02 / math.sqrt(2 * L)

    def check_normal(x, std):
        x = np.asarray(x, np.float64)
        # the sample std of n normals has relative standard error 1/sqrt(2n); allow ~6 of those
        assert abs(x.std() / std - 1) < 6 / math.sqrt(2 * x.size), (x.std(), std)
        assert abs(x.mean()) < 6 * std / math.sqrt(x.size)

    check_normal(p["wte"]["embedding"], 0.02)
    check_normal(p["wpe"]["embedding"], 0.02)
    for i in range(L):
        blk = jax.tree.map(lambda a, i=i: np.asarray(a)[i], p["h"])
        check_normal(blk["attn"]["c_attn"]["kernel"], 0.02)
        check_normal(blk["mlp"]["c_fc"]["kernel"], 0.02)
        check_normal(blk["attn"]["c_proj"]["kernel"], proj_std)
        check_normal(blk["mlp"]["c_proj"]["kernel"], proj_std)
        for lin in (blk["attn"]["c_attn"], blk["attn"]["c_proj"], blk["mlp"]["c_fc"], blk["mlp"]["c_proj"]):
            np.testing.assert_array_equal(lin["bias"], 0.0)
        for ln in (blk["ln_1"], blk["ln_2"]):
            np.testing.assert_array_equal(ln["scale"], 1.0)
            np.testing.assert_array_equal(ln["bias"], 0.0)
    np.testing.assert_array_equal(p["ln_f"]["scale"], 1.0)
    np.testing.assert_array_equal(p["ln_f"]["bias"], 0.0)
    # different layers are independent draws
    assert not np.array_equal(p["h"]["attn"]["c_attn"]["kernel"][0], p["h"]["attn"]["c_attn"]["kernel"][1])
    # all parameters are float32 whatever the compute dtype
    bf16 = init_params(dataclasses.replace(config, dtype="bfloat16", n_layer=1), jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(bf16)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("model", ["gpt", "bigram"])
def test_jitted_init_draws_what_flax_draws_op_by_op(model, monkeypatch):
    """init_params is jitted; its weights are those of flax's own normal initializer run op by op, bit for bit
    (a fused draw would move last bits, and with them every loss a seed has given so far)."""
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False, model=model)
    jitted = init_params(config, jax.random.PRNGKey(1337))
    monkeypatch.setattr(model_module, "_normal", nn.initializers.normal)
    eager = init_params.__wrapped__(config, jax.random.PRNGKey(1337))  # not jitted: op by op
    assert_trees_equal(jitted, eager)


# ----------------------------------------------------------------------------------------------------------
# remat, loss, cropping


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_remat_same_loss_and_grads(dropout):
    config = dataclasses.replace(TINY, dropout=dropout)
    params = perturbed_params(config)
    idx = tokens(config, B=3)
    x, y = jnp.asarray(idx[:, :-1]), jnp.asarray(idx[:, 1:])
    key = jax.random.PRNGKey(5) if dropout else None
    results = []
    for scan in (True, False):
        for remat in ("none", "full", "dots"):
            model = make_model(dataclasses.replace(config, remat=remat, scan_layers=scan))
            results.append(jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(params, model, x, y, key))
    (l0, g0), *others = results
    for l1, g1 in others:
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7),
                     g0, g1)
    assert jax.tree_util.tree_structure(init_params(dataclasses.replace(config, remat="full"),
                                                    jax.random.PRNGKey(0))) == jax.tree_util.tree_structure(params)


def test_cross_entropy_matches_naive_with_ignore_index():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (3, 5))
    targets[0, 1] = targets[2, 4] = -1  # nanoGPT's ignore_index=-1
    logp = np_log_softmax(logits)
    nll = [-logp[b, t, targets[b, t]] for b in range(3) for t in range(5) if targets[b, t] >= 0]
    got = float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
    np.testing.assert_allclose(got, np.mean(nll), rtol=1e-6)
    # uniform logits: ln V
    np.testing.assert_allclose(float(cross_entropy(jnp.zeros((2, 4, 65)), jnp.zeros((2, 4), jnp.int32))),
                               math.log(65), rtol=1e-6)


def test_crop_block_size_keeps_first_positions():
    config = dataclasses.replace(TINY, block_size=32)
    params = perturbed_params(config)
    small, cropped = crop_block_size(config, params, 16)
    assert small.block_size == 16
    np.testing.assert_array_equal(cropped["wpe"]["embedding"], np.asarray(params["wpe"]["embedding"])[:16])
    idx = tokens(small)
    np.testing.assert_allclose(np.asarray(make_model(small).apply({"params": cropped}, jnp.asarray(idx))[0]),
                               np_forward(small, cropped, idx), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        crop_block_size(config, params, 64)
