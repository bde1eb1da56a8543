"""GPT-2 (and the lecture's bigram model) as pure-functional Flax linen modules.

Parameter names mirror HuggingFace GPT-2 (wte, wpe, h/ln_1, attn/c_attn, ...) so that the released
weights map key for key. The n_layer blocks are one module `h` run by `nn.scan`: each of its parameters
carries a leading layer axis (HF's h.N.attn.c_attn.weight is h/attn/c_attn/kernel[N]), so the compiled
program holds one layer body whatever the depth. Parameters are float32; `dtype` is the compute dtype of
the activations.
Shapes are in the names: B batch, T tokens of this call, R = B x T rows, S cached positions, C n_embd, N heads,
H head size, O a layer's outputs, V vocabulary, L layers. Errors are plain `ValueError`s; the command line words them as options.
"""

import dataclasses
import math
import re
from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from .kernels import Dense, Dropout, attention, on_rows

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
    attn_impl: str | None = None  # attention's kernel: None or "xla" (XLA's, written out), "cudnn" (cuDNN's)
    remat: str = "none"  # what a block keeps for the backward pass: REMAT_POLICIES' names
    scan_layers: bool = True  # one compiled layer body looped n_layer times; False unrolls the loop

    def __post_init__(self):
        if isinstance(self.remat, bool):  # records and callers from before the policies: True was "full"
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}: use one of {', '.join(REMAT_POLICIES)}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def has_attention(self) -> bool:
        """The one place the bigram model differs in kind: no positions, no layers, no KV cache."""
        return self.model == "gpt"


# What each block keeps for its backward pass. "none": everything (fastest, most memory); "full": only its
# input, the rest recomputed; "dots": the outputs of its weight products, the elementwise work recomputed.
REMAT_POLICIES = {"none": jax.checkpoint_policies.everything_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# The name of a layer's parameters as a `gather` hook returns them: never kept for the backward pass.
GATHERED = "gathered_layer_params"

# A key/value cache: (keys, values) of each layer, each (B, n_head, S, head_size), S <= block_size positions. One
# pair of arrays per layer, not one stacked array: a decoded token then writes one column of each in place,
# where a stacked cache goes through the layer loop's slices and XLA copies it whole on every token.
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


def _normal(std: float):
    """nn.initializers.normal: N(0, 1) draws times `std`. The barrier keeps XLA from folding `std` into the
    draw's own constants under jit (init_params is jitted), which would move last bits of the weights."""
    def init(key, shape, dtype=jnp.float32):
        return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype)) * jnp.asarray(std, dtype)
    return init


def _dense(config: GPTConfig, features: int, name: str, std: float = 0.02) -> Dense:
    return Dense(features, use_bias=config.bias, dtype=config.compute_dtype, param_dtype=jnp.float32,
                 kernel_init=_normal(std), bias_init=nn.initializers.zeros, name=name)


def _layer_norm(config: GPTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_bias=config.bias, dtype=config.compute_dtype,
                        param_dtype=jnp.float32, name=name)


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTC, deterministic: bool, kv=None, pos=None, start_B=None):
        c = self.config
        B, T, C = x_BTC.shape
        qkv_BT3C = _dense(c, 3 * C, "c_attn")(x_BTC)
        q, k, v = (t.reshape(B, T, c.n_head, C // c.n_head) for t in jnp.split(qkv_BT3C, 3, axis=-1))
        dropout = Dropout(c.dropout) if c.dropout > 0.0 and not deterministic else None
        y_BTNH, kv = attention(q, k, v, c.attn_impl, dropout, kv, pos, start_B)
        y_BTC = _dense(c, C, "c_proj", 0.02 / math.sqrt(2 * c.n_layer))(y_BTNH.reshape(B, T, C))
        return Dropout(c.dropout)(y_BTC, deterministic=deterministic), kv


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTC, deterministic: bool):
        c = self.config
        # The tanh-approximated GELU is GPT-2's own (HF's "gelu_new"), so released weights compute as trained.
        h_BT4C = nn.gelu(_dense(c, 4 * c.n_embd, "c_fc")(x_BTC), approximate=True)
        h_BTC = _dense(c, c.n_embd, "c_proj", 0.02 / math.sqrt(2 * c.n_layer))(h_BT4C)
        return Dropout(c.dropout)(h_BTC, deterministic=deterministic)


class Block(nn.Module):
    """One transformer layer, in nn.scan's form: (carry x, this layer's cache or None, pos, start_B,
    deterministic) -> (x, this layer's updated cache)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTC, kv, pos, start_B, deterministic: bool):
        a, kv = CausalSelfAttention(self.config, name="attn")(
            _layer_norm(self.config, "ln_1")(x_BTC), deterministic, kv, pos, start_B)
        x_BTC = x_BTC + a
        x_BTC = x_BTC + MLP(self.config, name="mlp")(_layer_norm(self.config, "ln_2")(x_BTC), deterministic)
        return x_BTC, kv


def layers(config: GPTConfig, gather: Callable | None = None) -> nn.Module:
    """The n_layer blocks as one module: parameters stacked on a leading layer axis, run by nn.scan (or the
    same loop unrolled). `gather(layer_params) -> layer_params` runs inside the loop on each layer's slice
    (FSDP's per-layer all-gather); what it returns is recomputed in the backward pass, never kept, so a
    device holds one layer's whole weights at a time."""
    block, policy = Block, REMAT_POLICIES[config.remat]
    if gather is not None:
        def named(variables):  # cast here, so that no compute-dtype copy of the weights is kept either
            return jax.tree.map(lambda x: checkpoint_name(x.astype(config.compute_dtype), GATHERED), gather(variables))
        block = nn.map_variables(block, "params", trans_in_fn=named)
        if config.remat == "none":
            policy = jax.checkpoint_policies.save_anything_except_these_names(GATHERED)
    if gather is not None or config.remat != "none":
        # static_argnums counts self as 0: `deterministic` (argument 5) is a Python bool, not traced
        block = nn.remat(block, policy=policy, prevent_cse=not config.scan_layers, static_argnums=(5,))
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=config.n_layer,
                   unroll=1 if config.scan_layers else config.n_layer)(config, name="h")


class GPT(nn.Module):
    """GPT-2. Returns (logits (B, T, vocab) float32, updated cache or None).

    With `cache` (from `init_cache`), the tokens sit at cache columns pos..pos+T-1 and attend to the cached
    keys and values, the layers run one by one (`_cached_layers`); without it, the whole causal sequence is
    computed. `start_B` (cached calls): row b's first real column, the columns before it left padding that no
    token attends to, and row b's positions count from it, so a left-padded row computes what it would alone.
    `logits_at`: the one column whose logits are computed (sampling needs no more; None: all). `gather`: see
    `layers`.
    """

    config: GPTConfig
    gather: Callable | None = None

    @nn.compact
    def __call__(self, idx_BT, deterministic: bool = True, cache: KVCache | None = None, pos=0, start_B=None,
                 logits_at=None):
        c = self.config
        T = idx_BT.shape[1]
        if isinstance(pos, int) and pos + T > c.block_size:  # a traced pos is generate's, which stays inside
            raise ValueError(f"cannot run a sequence of {pos + T} tokens: the model has block_size "
                             f"{c.block_size} positions")
        emb = dict(dtype=c.compute_dtype, param_dtype=jnp.float32, embedding_init=_normal(0.02))
        wte = nn.Embed(c.vocab_size, c.n_embd, name="wte", **emb)
        wpe = nn.Embed(c.block_size, c.n_embd, name="wpe", **emb)
        position_BT = (pos + jnp.arange(T))[None]
        if start_B is not None:  # a padding column takes position 0: it is seen by nothing
            position_BT = jnp.maximum(position_BT - start_B[:, None], 0)
        x_BTC = wte(idx_BT) + wpe(position_BT)
        x_BTC = Dropout(c.dropout)(x_BTC, deterministic=deterministic)
        if cache is None:
            x_BTC, _ = layers(c, self.gather)(x_BTC, None, pos, start_B, deterministic)
        else:
            x_BTC, cache = _cached_layers(c, self.variables["params"], x_BTC, cache, pos, start_B)
        x_BTC = _layer_norm(c, "ln_f")(_column(x_BTC, logits_at))
        logits_BTV = on_rows(wte.attend, x_BTC).astype(jnp.float32)  # weight tying: lm_head = wte
        return logits_BTV, cache


def _cached_layers(config: GPTConfig, params, x_BTC, cache: KVCache, pos, start_B):
    """The blocks of `layers` one after the other, each against its own cache (decoding). Layer i's weights
    are params' h_i where the caller unstacked them once (`unstack_layers`: sliced inside a decoding loop,
    XLA copies every layer's weights on every token), else sliced from the stacked h. Returns (x, cache)."""
    block = Block(config, parent=None)
    updated = []
    for i, kv in enumerate(cache):
        layer = params[f"h_{i}"] if f"h_{i}" in params else jax.tree.map(lambda p, i=i: p[i], params["h"])
        x_BTC, kv = block.apply({"params": layer}, x_BTC, kv, pos, start_B, True)
        updated.append(kv)
    return x_BTC, tuple(updated)


class Bigram(nn.Module):
    """The lecture's bigram model: the next token's logits are read from a table indexed by this token."""

    config: GPTConfig

    @nn.compact
    def __call__(self, idx_BT, deterministic: bool = True, cache=None, pos=0, start_B=None, logits_at=None):
        c = self.config
        table = nn.Embed(c.vocab_size, c.vocab_size, param_dtype=jnp.float32,
                         embedding_init=_normal(0.02), name="wte")
        return table(_column(idx_BT, logits_at)).astype(jnp.float32), cache


def _column(x_BT, at):
    """Column `at` of x (kept as a length-1 axis; `at` may be traced), or all of x when `at` is None."""
    return x_BT if at is None else jax.lax.dynamic_slice_in_dim(x_BT, at, 1, axis=1)


def make_model(config: GPTConfig, gather: Callable | None = None) -> nn.Module:
    """The model `config` names; `gather` (the GPT's per-layer hook, see `layers`) is FSDP's."""
    if config.model == "gpt":
        return GPT(config, gather)
    if config.model == "bigram":
        return Bigram(config)
    raise ValueError(f"unknown model {config.model!r}: use one of bigram, gpt")


class _Layer(nn.Module):
    """Block i alone, under the name h_i: its init draws the numbers the model has drawn for that layer
    since before the layers were stacked (flax derives each parameter's key from its path)."""

    config: GPTConfig
    index: int

    @nn.compact
    def __call__(self, x_BTC):
        return Block(self.config, name=f"h_{self.index}")(x_BTC, None, 0, None, True)


@partial(jax.jit, static_argnums=0)
def init_params(config: GPTConfig, key: jax.Array):
    """Freshly initialised float32 parameters (GPT-2 init). Layer i is drawn under its own name h_i and the
    layers then stacked: the same numbers, run for run, as when each layer was a module of its own. Jitted:
    run op by op, the draws compile ~160 programs, 2.5 s and 400 MB of a small run's start."""
    dummy = jnp.zeros((1, min(config.block_size, 8)), jnp.int32)
    if not config.has_attention:
        return make_model(config).init(key, dummy)["params"]
    x = jnp.zeros((1, 1, config.n_embd), config.compute_dtype)
    drawn = [_Layer(config, i).init(key, x)["params"][f"h_{i}"] for i in range(config.n_layer)]
    # wte, wpe and ln_f from a one-layer model: their draws do not depend on the depth, and its h is dropped.
    one_layer = make_model(dataclasses.replace(config, n_layer=1))
    params = {n: p for n, p in one_layer.init(key, dummy)["params"].items() if n != "h"}
    return {**params, "h": jax.tree.map(lambda *layer: jnp.stack(layer), *drawn)}


def init_cache(config: GPTConfig, batch_size: int, length: int | None = None) -> KVCache:
    """An empty key/value cache holding `length` positions (default block_size; the bigram model needs
    none). Decoding attends over every position of the cache, so a cache no longer than the sequence is
    less to read per token."""
    if not config.has_attention:
        return ()
    shape = (batch_size, config.n_head, length or config.block_size, config.n_embd // config.n_head)
    return tuple((jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype))
                 for _ in range(config.n_layer))


# ------------------------------------------------------------------------------- stacked and per-layer trees

_LAYER = re.compile(r"h_(\d+)")


def _map_dicts(f, tree):
    """f applied to every dict of a tree, innermost first (params, and AdamW's moments inside optax's tuples)."""
    if isinstance(tree, dict):
        return f({k: _map_dicts(f, v) for k, v in tree.items()})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_dicts(f, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_dicts(f, v) for v in tree)
    return tree


def stack_layers(tree):
    """Layers h_0 .. h_{L-1}, each a module of its own (HF's h.N, checkpoints before record version 3) -> one
    `h` whose leaves carry a leading layer axis, wherever such layers sit in the tree."""
    def stack(d):
        index = sorted(int(m.group(1)) for k in d if (m := _LAYER.fullmatch(k)))
        if not index:
            return d
        rest = {k: v for k, v in d.items() if not _LAYER.fullmatch(k)}
        return {**rest, "h": jax.tree.map(lambda *xs: jnp.stack(xs), *(d[f"h_{i}"] for i in index))}

    return _map_dicts(stack, tree)


def unstack_layers(tree, take=lambda x, i: x[i]):
    """The inverse of stack_layers; `take(leaf, i)` is layer i of a stacked leaf (abstract trees pass their own)."""
    def unstack(d):
        if "h" not in d:
            return d
        n = jax.tree_util.tree_leaves(d["h"])[0].shape[0]
        rest = {k: v for k, v in d.items() if k != "h"}
        return {**rest, **{f"h_{i}": jax.tree.map(lambda x, i=i: take(x, i), d["h"]) for i in range(n)}}

    return _map_dicts(unstack, tree)


def cross_entropy(logits_BTV, targets_BT):
    """Mean token cross-entropy; targets of -1 are ignored, as nanoGPT's ignore_index=-1.

    The arithmetic of -take_along_axis(log_softmax(logits), targets), with the target's logit picked by a
    one-hot mask instead of a gather: the gradient is then elementwise, and XLA fuses the softmax's
    backward into one pass over the (B, T, V) logits rather than first scattering into an array that size."""
    x_BTV = logits_BTV.astype(jnp.float32)
    shifted_BTV = x_BTV - jax.lax.stop_gradient(jnp.max(x_BTV, axis=-1, initial=-jnp.inf, keepdims=True))
    lse_BT = jnp.log(jnp.sum(jnp.exp(shifted_BTV), axis=-1))
    valid_BT = targets_BT >= 0
    onehot_BTV = jnp.arange(x_BTV.shape[-1]) == jnp.where(valid_BT, targets_BT, 0)[..., None]
    target_BT = jnp.sum(jnp.where(onehot_BTV, shifted_BTV, 0.0), axis=-1)  # exact: one term is not zero
    nll_BT = -(target_BT - lse_BT)
    return jnp.sum(jnp.where(valid_BT, nll_BT, 0.0)) / jnp.maximum(jnp.sum(valid_BT), 1)


def num_params(params, non_embedding: bool = True) -> int:
    """Parameter count as nanoGPT reports it: position embeddings excluded, tied wte counted once."""
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    if non_embedding and "wpe" in params:  # the bigram model has no positions
        n -= params["wpe"]["embedding"].size
    return n


def crop_block_size(config: GPTConfig, params, block_size: int):
    """Shrink the context length (e.g. load GPT-2 at 1024, finetune at 256): keeps the first positions."""
    if block_size > config.block_size:
        raise ValueError(f"block_size {block_size}: the model has only {config.block_size} positions; "
                         "it can be cropped, not grown")
    params = dict(params)
    if "wpe" in params:
        params["wpe"] = {"embedding": params["wpe"]["embedding"][:block_size]}
    return dataclasses.replace(config, block_size=block_size), params
