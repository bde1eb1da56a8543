"""Sampling: a jitted, KV-cached, batched `generate` with temperature, top-k and top-p.

While the sequence fits in block_size, the prompt is prefilled once and each new token costs one
cached decode step. Beyond block_size nanoGPT crops the context to the last block_size tokens; GPT-2's
absolute position embeddings then shift under every cached key, so each further token is a forward
pass over the cropped window. Both phases are fixed-length `lax.scan`s: one compilation per shape.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .model import GPTConfig, init_cache, make_model


def known_greedy(temperature) -> bool:
    """A temperature of 0 known before tracing (a traced one is only known at run time)."""
    return not isinstance(temperature, jax.core.Tracer) and float(temperature) == 0.0


def sample_logits(logits_BV, key, temperature, top_k: int | None = None, top_p: float | None = None):
    """Next token ids (B,) from logits: greedy when temperature == 0, else top-k/top-p filtered sampling.
    A temperature of 0 known before tracing draws no random numbers (over GPT-2's 50257 logits they cost a
    greedy decode step on a CPU a tenth of its time); a traced one computes both and picks."""
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if known_greedy(temperature):
        return greedy_B
    scaled = logits_BV / jnp.where(temperature > 0, temperature, 1.0)
    if top_k is not None:
        kth = jax.lax.top_k(scaled, min(top_k, scaled.shape[-1]))[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p is not None:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the argmax always stays).
        sorted_BV = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy_B)


def generate(config: GPTConfig, params, prompt, max_new_tokens: int, *, key, temperature=1.0,
             top_k: int | None = None, top_p: float | None = None, vocab_size: int | None = None):
    """Continue int32 prompts (B, T0) by max_new_tokens tokens; returns (B, T0 + max_new_tokens).

    `vocab_size` limits sampling to the tokenizer's ids when the model's vocabulary is padded
    (nanoGPT trains GPT-2 BPE models with 50304 outputs for 50257 tokens). Bad arguments raise ValueError
    before anything is compiled: a jitted call would clamp out-of-range ids silently."""
    check_arguments(config, prompt, max_new_tokens, top_k, top_p, vocab_size)
    # greedy is static: a greedy call compiles a decode loop without random numbers.
    return _generate(config, params, prompt, max_new_tokens, key=key, temperature=temperature, top_k=top_k,
                     top_p=top_p, vocab_size=vocab_size, greedy=known_greedy(temperature))


def check_arguments(config: GPTConfig, prompt, max_new_tokens, top_k, top_p, vocab_size) -> None:
    shape, dtype = np.shape(prompt), getattr(prompt, "dtype", None) or np.asarray(prompt).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"generate: the prompt holds token ids and must be integers, not {dtype}")
    if len(shape) != 2:
        raise ValueError(f"generate: the prompt must be 2-D (batch, tokens), not of shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"generate: the prompt of shape {tuple(shape)} is empty; give at least one token per row")
    limit = vocab_size or config.vocab_size
    if not isinstance(prompt, jax.core.Tracer):  # inside the caller's own jit only the shape is known
        ids = np.asarray(prompt)  # on the host: no device reduction compiled per prompt shape
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= limit:
            raise ValueError(f"generate: the prompt holds token id {low if low < 0 else high}; ids must be in "
                             f"[0, {limit})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an int, at least 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k={top_k} must be at least 1 (None keeps every token)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1] (None keeps every token)")


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "top_k", "top_p", "vocab_size", "greedy"))
def _generate(config: GPTConfig, params, prompt, max_new_tokens: int, *, key, temperature=1.0,
              top_k: int | None = None, top_p: float | None = None, vocab_size: int | None = None,
              greedy: bool = False):
    model = make_model(config)
    B, T0 = prompt.shape
    S, total = config.block_size, T0 + max_new_tokens
    tokens = jnp.zeros((B, total), jnp.int32).at[:, :T0].set(prompt.astype(jnp.int32))
    keys = jax.random.split(key, max(max_new_tokens, 1))

    def sample(logits_BV, k):
        return sample_logits(logits_BV[:, :vocab_size], k, 0.0 if greedy else temperature, top_k, top_p)

    apply = partial(model.apply, {"params": params}, last_only=True)
    if max_new_tokens == 0:
        return tokens

    # Phase 1 (the sequence fits): prefill, then one cached step per token, up to token index S.
    n_cached = min(S - T0 + 1, max_new_tokens) if T0 <= S else 0
    if n_cached > 0:
        # The cache holds only the positions this call fills: every decode step reads all of it.
        logits, cache = apply(tokens[:, :T0], cache=init_cache(config, B, min(total, S)), pos=0)
        tokens = tokens.at[:, T0].set(sample(logits[:, -1], keys[0]))

        def cached_step(carry, i):  # feeds the token at position T0 + i, samples the one after it
            tokens, cache = carry
            pos = T0 + i
            logits, cache = apply(jax.lax.dynamic_slice_in_dim(tokens, pos, 1, axis=1), cache=cache, pos=pos)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, sample(logits[:, -1], keys[i + 1])[:, None],
                                                         pos + 1, axis=1)
            return (tokens, cache), None

        (tokens, _), _ = jax.lax.scan(cached_step, (tokens, cache), jnp.arange(n_cached - 1))

    # Phase 2 (beyond block_size): the context is the last S tokens, recomputed for every new token.
    def cropped_step(tokens, i):  # samples token index i from tokens[i - S : i]
        logits, _ = apply(jax.lax.dynamic_slice_in_dim(tokens, i - S, S, axis=1))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, sample(logits[:, -1], keys[i - T0])[:, None],
                                                     i, axis=1)
        return tokens, None

    if T0 + n_cached < total:
        tokens, _ = jax.lax.scan(cropped_step, tokens, jnp.arange(T0 + n_cached, total))
    return tokens


generate._cache_size = _generate._cache_size  # compilations so far, as on a jitted function
