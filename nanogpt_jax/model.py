"""GPT-2 (and the lecture's bigram model) as pure-functional Flax linen modules.

Parameter names mirror HuggingFace GPT-2 (wte, wpe, h_N/ln_1, attn/c_attn, ...) so that the released
weights map key for key. Parameters are float32; `dtype` is the compute dtype of the activations.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64, as nanoGPT does
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    model: str = "gpt"  # "gpt" or "bigram"
    dtype: str = "float32"  # compute dtype; parameters stay float32
    attn_impl: str | None = None  # jax.nn.dot_product_attention implementation: None, "xla" or "cudnn"
    remat: bool = False  # recompute each block in the backward pass: less memory, more compute

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


# A key/value cache: one (k, v) pair per layer, each (B, S, n_head, head_size), S = block_size.
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


def _dense(config: GPTConfig, features: int, name: str, std: float = 0.02) -> nn.Dense:
    return nn.Dense(features, use_bias=config.bias, dtype=config.compute_dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.zeros, name=name)


def _layer_norm(config: GPTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_bias=config.bias, dtype=config.compute_dtype,
                        param_dtype=jnp.float32, name=name)


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTC, deterministic: bool, kv=None, pos=None):
        c = self.config
        B, T, C = x_BTC.shape
        hs = C // c.n_head
        qkv = _dense(c, 3 * C, "c_attn")(x_BTC)
        q, k, v = (t.reshape(B, T, c.n_head, hs) for t in jnp.split(qkv, 3, axis=-1))  # (B, T, nh, hs)
        if kv is not None:
            # Decoding: write this chunk's keys/values at `pos` and attend to everything cached so far.
            k_cache = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, pos, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, pos, 0, 0))
            kv = (k_cache, v_cache)
            mask_TS = jnp.arange(k_cache.shape[1])[None, :] <= pos + jnp.arange(T)[:, None]
            y = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask_TS[None, None])
        elif c.dropout > 0.0 and not deterministic:
            # dot_product_attention has no dropout; nanoGPT drops attention probabilities while training.
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hs)  # (B, nh, T, T)
            causal = jnp.tril(jnp.ones((T, T), dtype=bool))
            att = jax.nn.softmax(jnp.where(causal, att.astype(jnp.float32), -jnp.inf), axis=-1)
            att = nn.Dropout(c.dropout)(att, deterministic=False).astype(v.dtype)
            y = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        else:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=c.attn_impl)
        y = _dense(c, C, "c_proj", 0.02 / math.sqrt(2 * c.n_layer))(y.reshape(B, T, C))
        return nn.Dropout(c.dropout)(y, deterministic=deterministic), kv


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTC, deterministic: bool):
        c = self.config
        h = nn.gelu(_dense(c, 4 * c.n_embd, "c_fc")(x_BTC), approximate=True)
        h = _dense(c, c.n_embd, "c_proj", 0.02 / math.sqrt(2 * c.n_layer))(h)
        return nn.Dropout(c.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTC, deterministic: bool, kv=None, pos=None):
        a, kv = CausalSelfAttention(self.config, name="attn")(
            _layer_norm(self.config, "ln_1")(x_BTC), deterministic, kv, pos)
        x_BTC = x_BTC + a
        x_BTC = x_BTC + MLP(self.config, name="mlp")(_layer_norm(self.config, "ln_2")(x_BTC), deterministic)
        return x_BTC, kv


class GPT(nn.Module):
    """GPT-2. Returns (logits (B, T, vocab) float32, updated cache or None).

    With `cache` (from `init_cache`), the tokens are taken to sit at positions pos..pos+T-1 and
    attend to the cached keys and values; without it, the whole causal sequence is computed.
    `last_only` computes logits for the last position only (sampling needs no more).
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, idx_BT, deterministic: bool = True, cache: KVCache | None = None, pos=0,
                 last_only: bool = False):
        c = self.config
        T = idx_BT.shape[1]
        emb = dict(dtype=c.compute_dtype, param_dtype=jnp.float32, embedding_init=nn.initializers.normal(0.02))
        wte = nn.Embed(c.vocab_size, c.n_embd, name="wte", **emb)
        wpe = nn.Embed(c.block_size, c.n_embd, name="wpe", **emb)
        x = wte(idx_BT) + wpe(pos + jnp.arange(T))[None]  # (B, T, C)
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        block = nn.remat(Block, static_argnums=(2,)) if c.remat else Block
        new_cache = []
        for i in range(c.n_layer):
            x, kv = block(c, name=f"h_{i}")(x, deterministic, None if cache is None else cache[i], pos)
            new_cache.append(kv)
        x = _layer_norm(c, "ln_f")(x[:, -1:] if last_only else x)
        logits = wte.attend(x).astype(jnp.float32)  # weight tying: lm_head = wte
        return logits, None if cache is None else tuple(new_cache)


class Bigram(nn.Module):
    """The lecture's bigram model: the next token's logits are read from a table indexed by this token."""

    config: GPTConfig

    @nn.compact
    def __call__(self, idx_BT, deterministic: bool = True, cache=None, pos=0, last_only: bool = False):
        c = self.config
        table = nn.Embed(c.vocab_size, c.vocab_size, param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(0.02), name="wte")
        return table(idx_BT[:, -1:] if last_only else idx_BT).astype(jnp.float32), cache


def make_model(config: GPTConfig) -> nn.Module:
    models = {"gpt": GPT, "bigram": Bigram}
    if config.model not in models:
        raise ValueError(f"unknown model {config.model!r}: use one of {sorted(models)}")
    return models[config.model](config)


def init_params(config: GPTConfig, key: jax.Array):
    """Freshly initialised float32 parameters (GPT-2 init)."""
    dummy = jnp.zeros((1, min(config.block_size, 8)), jnp.int32)
    return make_model(config).init(key, dummy)["params"]


def init_cache(config: GPTConfig, batch_size: int) -> KVCache:
    """An empty key/value cache holding block_size positions (the bigram model needs none)."""
    if config.model == "bigram":
        return ()
    shape = (batch_size, config.block_size, config.n_head, config.n_embd // config.n_head)
    return tuple((jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype))
                 for _ in range(config.n_layer))


def cross_entropy(logits_BTV, targets_BT):
    """Mean token cross-entropy; targets of -1 are ignored, as nanoGPT's ignore_index=-1."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    valid = targets_BT >= 0
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets_BT, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def num_params(params, non_embedding: bool = True) -> int:
    """Parameter count as nanoGPT reports it: position embeddings excluded, tied wte counted once."""
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    if non_embedding and "wpe" in params:
        n -= params["wpe"]["embedding"].size
    return n


def crop_block_size(config: GPTConfig, params, block_size: int):
    """Shrink the context length (e.g. load GPT-2 at 1024, finetune at 256): keeps the first positions."""
    if block_size > config.block_size:
        raise ConfigError(f"--block_size={block_size}: the model has only {config.block_size} positions; "
                          "it can be cropped, not grown")
    params = dict(params)
    if "wpe" in params:
        params["wpe"] = {"embedding": params["wpe"]["embedding"][:block_size]}
    return dataclasses.replace(config, block_size=block_size), params
