"""The kernels under the model, and the choice between them: causal attention (cuDNN's fused kernel, or XLA's
written out heads-first, in query blocks past ATTENTION_BLOCK tokens; with nanoGPT's dropout of attention
probabilities; against the KV cache when decoding), dropout's mask, and the linear layers' row layout. model.py
says what the network computes; this module says how, per backend.

Shapes: B batch, T tokens of this call, R = B x T rows, S cached positions, N heads, H head size, O outputs.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def on_rows(linear, x_BTC):
    """linear(x) with x's (B, T) flattened into R rows. A weight's gradient is then a plain (C, R) x (R, out)
    product: contracted over (B, T), XLA:CPU wrote the gradient flowing into it transposed, element by element
    (each MLP's GELU backward: 15% of the CPU recipe's step). The arithmetic is the same."""
    y_RO = linear(x_BTC.reshape(-1, x_BTC.shape[-1]))
    return y_RO.reshape(*x_BTC.shape[:-1], y_RO.shape[-1])


class Dense(nn.Dense):
    """nn.Dense on_rows."""

    def __call__(self, x):
        return on_rows(super().__call__, x)


def keep_mask(key, rate: float, shape) -> jax.Array:
    """Dropout's keep mask: 16 random bits per element, two elements to each 32-bit threefry word of
    jax.random.bits, against the keep probability 1 - rate rounded to a multiple of 1/65536 (at least one).
    nn.Dropout draws a 32-bit word per element and makes a float of it: on a CPU that was 13% of the char
    step, and for its attention probabilities this mask takes a quarter of that time."""
    n = math.prod(shape)
    bits = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
    bits_16 = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)[:n].reshape(shape)
    return bits_16 < jnp.uint32(min(max(round((1.0 - rate) * 65536), 1), 65536))


class Dropout(nn.Module):
    """nanoGPT's dropout: each element zeroed with probability `rate` (in [0, 1)), the kept ones scaled by
    1 / (1 - rate); the mask is `keep_mask`'s."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        kept = keep_mask(self.make_rng("dropout"), self.rate, x.shape)
        return jnp.where(kept, x / (1.0 - self.rate), 0).astype(x.dtype)


# Query rows per block of causal_attention's XLA path (the fastest of 64-512 for GPT-2 124M at T=1024 on a CPU).
ATTENTION_BLOCK = 128


def causal_attention(q_BTNH, k_BTNH, v_BTNH, impl: str | None, dropout: Dropout | None = None):
    """Causal attention: cuDNN's fused kernel, or XLA's code written out heads-first (`_attend`; q, k, v
    transposed once, the result back once), in blocks of ATTENTION_BLOCK query rows, each against only the keys
    it can see: the masked upper triangle, about half of the scores at T=1024, is then neither computed nor kept
    for the backward pass. cuDNN skips it itself. With `dropout` (training), nanoGPT's dropout of the attention
    probabilities, which cuDNN's kernel here does not have: always XLA's."""
    if impl == "cudnn" and dropout is None:
        return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True, implementation=impl)
    q_BNTH, k_BNTH, v_BNTH = (t.swapaxes(1, 2) for t in (q_BTNH, k_BTNH, v_BTNH))
    T = q_BNTH.shape[2]
    blocks = []
    for start in range(0, T, ATTENTION_BLOCK):
        end = min(start + ATTENTION_BLOCK, T)
        mask_QS = jnp.arange(end)[None, :] <= start + jnp.arange(end - start)[:, None]
        blocks.append(_attend(q_BNTH[:, :, start:end], k_BNTH[:, :, :end], v_BNTH[:, :, :end], mask_QS, dropout))
    return jnp.concatenate(blocks, axis=2).swapaxes(1, 2)


def _attend(q_BNTH, k_BNSH, v_BNSH, mask_TS, dropout: Dropout | None = None):
    """softmax(q k^T / sqrt(H), masked) v on heads-first operands, the layout the batched products read: on
    (B, T, N, H) operands (jax.nn.dot_product_attention's XLA path) XLA:CPU added transposing copies around
    them, and the step of the CPU recipe ran 7-10% slower on a Zen 4. Scores and softmax in float32 whatever the
    compute dtype, scaled after the product as nanoGPT and jax.nn.dot_product_attention do; bfloat16 scores
    under jax.nn.dot_product_attention's DotAlgorithmPreset (BF16_BF16_F32, jax#24047), so that GPU and TPU
    compute them as before."""
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_BNTH.dtype == jnp.bfloat16 else None
    att_BNTS = jnp.einsum("bnth,bnsh->bnts", q_BNTH, k_BNSH, precision=precision,
                          preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q_BNTH.shape[-1]))
    att_BNTS = jax.nn.softmax(jnp.where(mask_TS, att_BNTS, -jnp.inf), axis=-1)
    if dropout is not None:
        att_BNTS = dropout(att_BNTS, deterministic=False)
    return jnp.einsum("bnts,bnsh->bnth", att_BNTS.astype(v_BNSH.dtype), v_BNSH)


def cached_attention(q_BTNH, k_BTNH, v_BTNH, kv, pos, start_B=None):
    """Decoding: write this chunk's keys/values into the (B, N, S, H) cache at column `pos` and attend to every
    column filled so far, from row b's `start_B[b]` on (the columns before it are left padding). Returns
    (y, updated (k, v) cache).

    The cache is kept heads-first, the layout the score and value products read: kept (B, S, N, H), XLA
    transposed the whole cache of every layer on every decoded token (a quarter of a batch-8 step on a CPU)."""
    k_BNSH = jax.lax.dynamic_update_slice(kv[0], k_BTNH.swapaxes(1, 2).astype(kv[0].dtype), (0, 0, pos, 0))
    v_BNSH = jax.lax.dynamic_update_slice(kv[1], v_BTNH.swapaxes(1, 2).astype(kv[1].dtype), (0, 0, pos, 0))
    T, S = q_BTNH.shape[1], k_BNSH.shape[2]
    column_T = pos + jnp.arange(T)
    mask_BTS = (jnp.arange(S)[None, :] <= column_T[:, None])[None]
    if start_B is not None:
        # A padding column's query sees only itself: a row with no key at all would be 0/0 = NaN, which its
        # value product would carry into the real rows' scores of later layers.
        first_BT = jnp.minimum(start_B[:, None], column_T[None, :])
        mask_BTS = mask_BTS & (jnp.arange(S)[None, None, :] >= first_BT[..., None])
    y_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BNSH.swapaxes(1, 2), v_BNSH.swapaxes(1, 2),
                                          mask=mask_BTS[:, None])
    return y_BTNH, (k_BNSH, v_BNSH)


def attention(q_BTNH, k_BTNH, v_BTNH, impl: str | None, dropout: Dropout | None = None, kv=None, pos=None,
              start_B=None):
    """Causal attention as the call needs it: against the cache `kv` when decoding (returns the updated
    cache), else `causal_attention` (`impl` None or "xla": XLA's; "cudnn"), with `dropout` of the attention
    probabilities when training. Returns (y (B, T, N, H), cache or None)."""
    if kv is not None:
        return cached_attention(q_BTNH, k_BTNH, v_BTNH, kv, pos, start_B)
    return causal_attention(q_BTNH, k_BTNH, v_BTNH, impl, dropout), None
