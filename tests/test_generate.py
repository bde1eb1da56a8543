"""generate: KV-cached decoding against a naive recompute-everything reference (nanoGPT's sample loop)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax import GPTConfig, generate, init_params, make_model
from nanogpt_jax.generate import generate_stream, sample_logits

CONFIG = GPTConfig(block_size=8, vocab_size=23, n_layer=2, n_head=2, n_embd=16, bias=True)


@pytest.fixture(scope="module")
def params():
    p = init_params(CONFIG, jax.random.PRNGKey(0))
    # Larger-than-init weights give peaked, varied logits, so a wrong context changes the argmax.
    return jax.tree.map(lambda x: x * 8.0, p)


@partial(jax.jit, static_argnums=0)
def last_logits(config, params, idx):
    """The whole forward pass over idx, the last position's logits: one compilation per context length (at most
    block_size of them, shared by every test), where running it eagerly recompiled every op at every step."""
    return make_model(config).apply({"params": params}, idx)[0][:, -1]


def naive_greedy(config, params, prompt, max_new_tokens):
    """nanoGPT's loop: crop to the last block_size tokens, run the whole forward, take the argmax."""
    idx = np.asarray(prompt)
    for _ in range(max_new_tokens):
        logits = last_logits(config, params, jnp.asarray(idx[:, -config.block_size:]))
        idx = np.concatenate([idx, np.argmax(np.asarray(logits), axis=-1)[:, None]], axis=1)
    return idx


# (1, 5) inside block_size and (3, 20) across it in the quick set; the edges with the slow tests
@pytest.mark.parametrize("t0,new", [(1, 5), (3, 20)] + [pytest.param(*case, marks=pytest.mark.slow)
                                                         for case in [(3, 5), (1, 7), (1, 8), (8, 6), (11, 9)]])
def test_greedy_equals_naive_inside_and_beyond_block_size(params, t0, new):
    prompt = jax.random.randint(jax.random.PRNGKey(t0), (2, t0), 0, CONFIG.vocab_size)
    out = generate(CONFIG, params, prompt, new, key=jax.random.PRNGKey(1), temperature=0.0)
    assert out.shape == (2, t0 + new) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), naive_greedy(CONFIG, params, prompt, new))


def test_top_k_one_equals_greedy(params):
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    greedy = generate(CONFIG, params, prompt, 12, key=jax.random.PRNGKey(0), temperature=0.0)
    top1 = generate(CONFIG, params, prompt, 12, key=jax.random.PRNGKey(5), temperature=1.3, top_k=1)
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_traced_zero_temperature_is_greedy_too(params):
    """Inside the caller's own jit the temperature is traced: generate cannot compile the greedy-only loop,
    and the sampling path with temperature 0 must still give the naive greedy tokens."""
    prompt = jnp.array([[4, 1, 7]], jnp.int32)
    traced = jax.jit(lambda t: generate(CONFIG, params, prompt, 12, key=jax.random.PRNGKey(2), temperature=t))
    np.testing.assert_array_equal(np.asarray(traced(0.0)), naive_greedy(CONFIG, params, prompt, 12))


@pytest.mark.slow
def test_batch_rows_equal_one_prompt_at_a_time(params):
    prompts = jax.random.randint(jax.random.PRNGKey(3), (4, 3), 0, CONFIG.vocab_size)
    batch = generate(CONFIG, params, prompts, 15, key=jax.random.PRNGKey(0), temperature=0.0)
    for i in range(4):
        row = generate(CONFIG, params, prompts[i:i + 1], 15, key=jax.random.PRNGKey(0), temperature=0.0)
        np.testing.assert_array_equal(np.asarray(batch[i]), np.asarray(row[0]))


def test_sampling_is_seeded_and_varied(params):
    prompt = jnp.zeros((3, 1), jnp.int32)
    a = generate(CONFIG, params, prompt, 20, key=jax.random.PRNGKey(0), temperature=1.0)
    b = generate(CONFIG, params, prompt, 20, key=jax.random.PRNGKey(0), temperature=1.0)
    c = generate(CONFIG, params, prompt, 20, key=jax.random.PRNGKey(1), temperature=1.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert len({tuple(r) for r in np.asarray(a).tolist()}) > 1  # rows are sampled independently


def test_one_compilation_per_shape(params):
    prompt = jnp.zeros((1, 2), jnp.int32)
    generate(CONFIG, params, prompt, 10, key=jax.random.PRNGKey(0), temperature=0.5)
    before = generate._cache_size()
    for t in (0.1, 0.7, 1.0):  # temperature and key are traced: no new compilation
        generate(CONFIG, params, prompt, 10, key=jax.random.PRNGKey(int(t * 10)), temperature=t)
    assert generate._cache_size() == before


def test_ragged_rows_equal_each_row_alone_inside_and_beyond_block_size(params):
    """Prompts of 1, 3, 5 and 8 tokens in one call, 12 new tokens (past block_size 8, into the cropped window):
    each row equals nanoGPT's loop over that prompt alone, as a list and as a left-padded array."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).astype(np.int32) for n in (1, 3, 5, 8)]
    rows = generate(CONFIG, params, prompts, 12, key=jax.random.PRNGKey(0), temperature=0.0)
    padded = np.stack([np.pad(p, (8 - len(p), 0), constant_values=7) for p in prompts])
    array = np.asarray(generate(CONFIG, params, padded, 12, key=jax.random.PRNGKey(0), temperature=0.0,
                                prompt_lengths=[1, 3, 5, 8]))
    for p, row, padded_row in zip(prompts, rows, array):
        alone = naive_greedy(CONFIG, params, p[None], 12)[0]
        np.testing.assert_array_equal(row, alone)
        np.testing.assert_array_equal(padded_row[8:], alone[len(p):])
    assert len({tuple(r[-12:]) for r in rows}) == 4


def test_a_row_that_emits_eos_stops_and_the_others_go_on(params):
    """Sampled (a token's draw does not depend on the stop), 14 tokens: each row equals the run without eos
    up to its first eos, then holds eos."""
    prompts = jax.random.randint(jax.random.PRNGKey(6), (4, 2), 0, CONFIG.vocab_size)
    options = dict(key=jax.random.PRNGKey(0), temperature=3.0)  # hot: this model's rows vary
    free = np.asarray(generate(CONFIG, params, prompts, 14, **options))[:, 2:]
    # an id row 0 emits early and some other row never does
    eos = next(t for t in free[0, :8] if any(t not in r for r in free[1:]))
    got = np.asarray(generate(CONFIG, params, prompts, 14, eos_id=int(eos), **options))[:, 2:]
    for f, g in zip(free, got):
        stop = list(f).index(eos) + 1 if eos in f else len(f)
        np.testing.assert_array_equal(g[:stop], f[:stop])
        assert (g[stop:] == eos).all()
    assert any(eos not in f for f in free)  # that row ran its whole budget


@pytest.mark.parametrize("eos", [None, 3])
def test_generate_stream_joins_to_generate(params, eos):
    prompt = jax.random.randint(jax.random.PRNGKey(8), (3, 2), 0, CONFIG.vocab_size)
    options = dict(key=jax.random.PRNGKey(2), temperature=0.9, top_k=5, eos_id=eos)
    whole = np.asarray(generate(CONFIG, params, prompt, 19, **options))[:, 2:]
    chunks = list(generate_stream(CONFIG, params, prompt, 19, chunk=4, **options))
    assert all(c.shape[1] <= 4 for c in chunks) and len(chunks) > 1
    joined = np.concatenate(chunks, axis=1)
    np.testing.assert_array_equal(joined, whole[:, :joined.shape[1]])
    assert (whole[:, joined.shape[1]:] == eos).all()  # past the step where every row had stopped


def test_prompt_lengths_5_to_60_compile_once():
    config = GPTConfig(block_size=64, vocab_size=23, n_layer=1, n_head=2, n_embd=16)
    p = init_params(config, jax.random.PRNGKey(0))
    before = generate._cache_size()
    for n in range(5, 61):
        generate(config, p, np.ones((2, n), np.int32), 6, key=jax.random.PRNGKey(n), temperature=0.7)
    assert generate._cache_size() == before + 2  # one prefill and one decode program


def test_top_k_and_top_p_keep_exactly_the_reference_sets():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)

    def drawn(**kw):
        ids = jax.vmap(lambda k: sample_logits(logits, k, 1.0, **kw))(keys)
        return set(np.asarray(ids).ravel().tolist())

    assert drawn(top_k=2) == {1, 3}  # the two most likely
    # nucleus: sorted probs .4 .3 .15 .1 .05; mass before each: 0 .4 .7 .85 .95
    assert drawn(top_p=0.5) == {1, 3}
    assert drawn(top_p=0.75) == {1, 3, 4}
    assert drawn(top_p=0.01) == {1}  # the argmax always stays
    assert drawn() == {0, 1, 2, 3, 4}


def test_sampling_follows_the_softmax_distribution():
    probs = np.array([0.1, 0.6, 0.3])
    keys = jax.random.split(jax.random.PRNGKey(1), 20000)
    ids = np.asarray(jax.vmap(lambda k: sample_logits(jnp.log(probs)[None], k, 1.0))(keys)).ravel()
    np.testing.assert_allclose(np.bincount(ids, minlength=3) / len(ids), probs, atol=0.015)
    # temperature 0.5 squares the odds: p^2 / sum(p^2)
    ids = np.asarray(jax.vmap(lambda k: sample_logits(jnp.log(probs)[None], k, 0.5))(keys)).ravel()
    np.testing.assert_allclose(np.bincount(ids, minlength=3) / len(ids), probs**2 / np.sum(probs**2), atol=0.015)


def test_bigram_generate_matches_naive():
    config = GPTConfig(block_size=4, vocab_size=11, model="bigram")
    params = jax.tree.map(lambda x: x * 50.0, init_params(config, jax.random.PRNGKey(2)))
    prompt = jnp.array([[3, 4]], jnp.int32)
    out = generate(config, params, prompt, 9, key=jax.random.PRNGKey(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out), naive_greedy(config, params, prompt, 9))


def test_vocab_size_keeps_padded_ids_out():
    """A padded vocabulary (nanoGPT's 50304 for GPT-2's 50257) must never yield an id the tokenizer lacks."""
    config = GPTConfig(block_size=4, vocab_size=11, model="bigram")
    params = init_params(config, jax.random.PRNGKey(2))
    # the last 3 ids overwhelmingly likely after any token: without the limit they are all that is sampled
    params["wte"]["embedding"] = params["wte"]["embedding"].at[:, -3:].set(50.0)
    prompt = jnp.zeros((4, 2), jnp.int32)
    free = generate(config, params, prompt, 10, key=jax.random.PRNGKey(0), temperature=1.0)
    assert np.asarray(free[:, 2:]).min() >= 8
    limited = generate(config, params, prompt, 10, key=jax.random.PRNGKey(0), temperature=1.0, vocab_size=8)
    assert np.asarray(limited).max() < 8


@pytest.mark.parametrize("prompt,kwargs,fragment", [
    (np.zeros((1, 3), np.float32), {}, "must be integers, not float32"),
    (np.zeros(3, np.int32), {}, "must be 2-D (batch, tokens), not of shape (3,)"),
    (np.zeros((1, 0), np.int32), {}, "is empty"),
    (np.array([[1, 23]], np.int32), {}, "token id 23; ids must be in [0, 23)"),
    (np.array([[-1, 2]], np.int32), {}, "token id -1"),
    (np.array([[1, 9]], np.int32), {"vocab_size": 8}, "token id 9; ids must be in [0, 8)"),
    (np.zeros((1, 2), np.int32), {"max_new_tokens": -1}, "max_new_tokens=-1"),
    (np.zeros((1, 2), np.int32), {"top_k": 0}, "top_k=0 must be at least 1"),
    (np.zeros((1, 2), np.int32), {"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
    (np.zeros((1, 2), np.int32), {"top_p": 1.5}, "top_p=1.5"),
    (np.zeros((1, 2), np.int32), {"max_new_tokens": 10**12}, "max_new_tokens=1000000000000 must be an int in"),
    (np.zeros((64, 2), np.int32), {"max_new_tokens": 2**30}, "generate: 64 x 1,073,741,824 new tokens needs about"),
    ([np.zeros((2, 2), np.int32), np.zeros(3, np.int32)], {}, "or as a list of 1-D token arrays"),
    (np.zeros((2, 3), np.int32), {"prompt_lengths": [3, 4]}, "prompt_lengths must hold 2 int(s) in [1, 3]"),
    ([np.zeros(2, np.int32), np.zeros(3, np.int32)], {"prompt_lengths": [2, 3]}, "gives its own lengths"),
    (np.zeros((1, 2), np.int32), {"eos_id": 23}, "eos_id=[23] must be token ids in [0, 23)"),
])
def test_bad_arguments_are_refused_before_compiling(params, prompt, kwargs, fragment):
    """Each in one line (the command line prints it as its error), before anything is compiled or allocated."""
    kwargs = {"max_new_tokens": 3, **kwargs}
    before = generate._cache_size()
    with pytest.raises(ValueError) as e:
        generate(CONFIG, params, prompt, key=jax.random.PRNGKey(0), **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value) and generate._cache_size() == before
