"""Sampling: a jitted, KV-cached, batched `generate` with temperature, top-k, top-p, stop tokens, prompts of
different lengths, and `generate_stream` for tokens as they are made.

Two programs do the work: `_prefill` (the prompt through the model, the first new token) and `_decode` (a
`while_loop` of one-token steps, ending at a token budget or when every row has stopped). While the sequence
fits in block_size each step is one cached decode step; beyond it nanoGPT crops the context to the last
block_size tokens, and GPT-2's absolute positions then shift under every cached key, so each further token
is a forward pass over the cropped window.

What compiles, and when: one `_prefill` per (batch, prompt bucket) and one `_decode` per (batch, prompt
bucket, new-token bucket), for each model config and sampling rule (top_k, top_p, vocab_size, eos_id,
greedy or not). Prompt widths and new-token budgets are padded up to multiples of BUCKET (the prompt to at
most block_size), and the real widths are run-time numbers: prompts of 5 to 60 tokens share one pair of
programs. The padding is never attended to, so the tokens are those of the exact shapes.
"""

import dataclasses
from functools import partial
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .memory import generate_bytes, refuse_unless_it_fits
from .model import GPTConfig, KVCache, init_cache, make_model, unstack_layers

BUCKET = 64


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


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a token is chosen, fixed per compiled program."""

    top_k: int | None
    top_p: float | None
    vocab_size: int | None
    greedy: bool  # temperature 0 known before tracing: no random numbers are drawn
    eos: tuple[int, ...]  # a row that emits one of these stops; its later columns hold eos[0]


class Decoding(NamedTuple):
    """The decode loop's carry. Columns: each row's prompt ends at column n_prompt (left padded before
    start_B[b]), the new tokens follow; unwritten columns hold eos (or 0)."""

    tokens: jax.Array  # (B, W) int32, W = prompt bucket + new-token bucket
    cache: KVCache  # each layer's (B, N, S, H) keys and values, S = min(W, block_size)
    start_B: jax.Array  # (B,) first real column of each row
    n_prompt: jax.Array  # () prompt columns
    n_new: jax.Array  # () new tokens written so far
    done_B: jax.Array  # (B,) rows that have emitted an eos token
    key: jax.Array
    temperature: jax.Array


def _write(rule: Rule, s: Decoding, logits_B1V, cache) -> Decoding:
    """Choose and write the token of column n_prompt + n_new (new token n_new draws fold_in(key, n_new), so a
    token does not depend on how the loop was cut into calls)."""
    temperature = 0.0 if rule.greedy else s.temperature
    token_B = sample_logits(logits_B1V[:, -1, :rule.vocab_size], jax.random.fold_in(s.key, s.n_new), temperature,
                            rule.top_k, rule.top_p)
    done_B = s.done_B
    if rule.eos:
        token_B = jnp.where(done_B, rule.eos[0], token_B)
        done_B = done_B | jnp.isin(token_B, jnp.asarray(rule.eos, jnp.int32))
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token_B[:, None], s.n_prompt + s.n_new, axis=1)
    return s._replace(tokens=tokens, cache=cache, n_new=s.n_new + 1, done_B=done_B)


@partial(jax.jit, static_argnames=("config", "rule", "new_bucket"))
def _prefill(config: GPTConfig, params, prompt_BT, n_prompt, start_B, key, temperature, *, rule: Rule,
             new_bucket: int) -> Decoding:
    """The prompt (B, prompt bucket; real columns < n_prompt) through the model; the first new token written."""
    B, T = prompt_BT.shape
    width = T + new_bucket
    filler = rule.eos[0] if rule.eos else 0
    tokens = jnp.where(jnp.arange(width) < n_prompt, jnp.pad(prompt_BT.astype(jnp.int32), ((0, 0), (0, new_bucket))),
                       filler)
    cache = init_cache(config, B, min(width, config.block_size))
    # The columns from n_prompt to T are filler: their keys are written over before any query reaches them.
    logits, cache = make_model(config).apply({"params": params}, prompt_BT, cache=cache, pos=0, start_B=start_B,
                                             logits_at=n_prompt - 1)
    s = Decoding(tokens, cache, start_B, jnp.asarray(n_prompt, jnp.int32), jnp.zeros((), jnp.int32),
                 jnp.zeros((B,), bool), key, jnp.asarray(temperature, jnp.float32))
    return _write(rule, s, logits, cache)


@partial(jax.jit, static_argnames=("config", "rule"))
def _decode(config: GPTConfig, params, s: Decoding, until, *, rule: Rule) -> Decoding:
    """Decode steps until `until` new tokens are written or every row has stopped."""
    apply = partial(make_model(config).apply, {"params": unstack_layers(params)})  # sliced once, not per token
    S, (B, W) = config.block_size, s.tokens.shape

    def going(s):
        return (s.n_new < until) & ~jnp.all(s.done_B)

    def cached_step(s):  # feeds the last written column, which the cache has room for
        column = s.n_prompt + s.n_new - 1
        logits, cache = apply(jax.lax.dynamic_slice_in_dim(s.tokens, column, 1, axis=1), cache=s.cache, pos=column,
                              start_B=s.start_B, logits_at=0)
        return _write(rule, s, logits, cache)

    def cropped_step(s):  # the last S columns, computed afresh (their positions have shifted)
        end = s.n_prompt + s.n_new
        window_BS = jax.lax.dynamic_slice_in_dim(s.tokens, end - S, S, axis=1)
        logits, _ = apply(window_BS, cache=init_cache(config, B, S), pos=0,
                          start_B=jnp.maximum(s.start_B - (end - S), 0), logits_at=S - 1)
        return _write(rule, s, logits, s.cache)

    s = jax.lax.while_loop(lambda s: going(s) & (s.n_prompt + s.n_new <= S), cached_step, s)
    if W > S:  # only then can a sequence outgrow the block
        s = jax.lax.while_loop(going, cropped_step, s)
    return s


def _round_up(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


@dataclasses.dataclass
class _Job:
    """One call's prompts laid out for the programs, and how to give the caller back its shape."""

    prompt_BT: jax.Array  # the last block_size columns of the prompt, right-padded to the prompt bucket
    start_B: jax.Array
    n_prompt: int
    head_BT: jax.Array | None  # the columns before those, or None
    lengths: list[int] | None  # the caller gave a list of 1-D prompts of these lengths
    rule: Rule
    new_bucket: int
    max_new_tokens: int

    def result(self, tokens_BW):
        out = tokens_BW[:, :self.n_prompt + self.max_new_tokens]
        if self.head_BT is not None:
            out = jnp.concatenate([self.head_BT, out], axis=1)
        if self.lengths is None:
            return out
        out = np.asarray(out)
        return [row[len(row) - n - self.max_new_tokens:] for row, n in zip(out, self.lengths)]


def _job(config: GPTConfig, prompt, max_new_tokens, temperature, top_k, top_p, vocab_size, prompt_lengths,
         eos_id) -> _Job:
    lengths = None
    if isinstance(prompt, (list, tuple)) and prompt and all(np.ndim(p) == 1 for p in prompt):
        lengths = [len(p) for p in prompt]
        if prompt_lengths is not None:
            raise ValueError("generate: a list of prompts gives its own lengths; pass prompt_lengths only with a "
                             "2-D array")
        width = max(lengths)
        prompt = np.stack([np.pad(np.asarray(p), (width - len(p), 0)) for p in prompt])
        prompt_lengths = lengths
    eos = () if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
    check_arguments(config, prompt, max_new_tokens, top_k, top_p, vocab_size, prompt_lengths, eos)
    B, T0 = np.shape(prompt)
    S = config.block_size
    if prompt_lengths is None:
        start_B = jnp.zeros((B,), jnp.int32)
    else:
        start_B = jnp.asarray(T0 - np.asarray(prompt_lengths), jnp.int32)
    prompt = jnp.asarray(prompt, jnp.int32)
    head_BT, n_prompt = None, min(T0, S)
    if T0 > S:  # only the last block_size columns are ever read
        head_BT, prompt = prompt[:, :T0 - S], prompt[:, T0 - S:]
        start_B = jnp.maximum(start_B - (T0 - S), 0)
    bucket = min(_round_up(n_prompt), S)
    rule = Rule(top_k, top_p, vocab_size, known_greedy(temperature), eos)
    job = _Job(jnp.pad(prompt, ((0, 0), (0, bucket - n_prompt))), start_B, n_prompt, head_BT, lengths, rule,
               _round_up(max_new_tokens), max_new_tokens)
    refuse_unless_it_fits(generate_bytes(config, B, bucket + job.new_bucket), f"generate: {B} x {max_new_tokens:,} "
                          "new tokens", "lower max_new_tokens or the rows (sample: --max_new_tokens or --num_samples)",
                          per_device=True)
    return job


def generate(config: GPTConfig, params, prompt, max_new_tokens: int, *, key, temperature=1.0,
             top_k: int | None = None, top_p: float | None = None, vocab_size: int | None = None,
             prompt_lengths=None, eos_id: int | Sequence[int] | None = None):
    """Continue int32 prompts (B, T0) by max_new_tokens tokens; returns (B, T0 + max_new_tokens).

    Prompts of different lengths: left-pad them into (B, T0) and give `prompt_lengths` (B,) (row b's real
    tokens are its last prompt_lengths[b]), or pass a list of 1-D prompts and get back a list of 1-D arrays,
    each its prompt and max_new_tokens new tokens. Padding is attended to by nothing and positions count from
    each row's first real token: a row's tokens are those it would get alone.
    `eos_id` (an id or several): a row that emits one stops, and its later tokens are eos_id (the first of
    several); decoding ends when every row has stopped. `vocab_size` limits sampling to the tokenizer's ids
    when the model's vocabulary is padded (nanoGPT trains GPT-2 BPE models with 50304 outputs for 50257
    tokens). Bad arguments, and sizes beyond a device's memory, raise ValueError before anything is compiled.
    See the module's docstring for what compiles when."""
    job = _job(config, prompt, max_new_tokens, temperature, top_k, top_p, vocab_size, prompt_lengths, eos_id)
    if max_new_tokens == 0:
        return job.result(job.prompt_BT)
    s = _prefill(config, params, job.prompt_BT, job.n_prompt, job.start_B, key, temperature, rule=job.rule,
                 new_bucket=job.new_bucket)
    return job.result(_decode(config, params, s, max_new_tokens, rule=job.rule).tokens)


def generate_stream(config: GPTConfig, params, prompt, max_new_tokens: int, *, key, chunk: int = 16, temperature=1.0,
                    top_k: int | None = None, top_p: float | None = None, vocab_size: int | None = None,
                    prompt_lengths=None, eos_id: int | Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """`generate`, yielding the new tokens (B, <= chunk) on the host as they are made; the chunks joined are
    generate's new tokens (with eos_id: up to the step where every row had stopped, after which generate's
    are all eos). Same options as generate; every chunk runs the same compiled decode program."""
    job = _job(config, prompt, max_new_tokens, temperature, top_k, top_p, vocab_size, prompt_lengths, eos_id)
    if max_new_tokens == 0:
        return
    s = _prefill(config, params, job.prompt_BT, job.n_prompt, job.start_B, key, temperature, rule=job.rule,
                 new_bucket=job.new_bucket)
    shown = 0
    while True:
        made = int(s.n_new)
        if made > shown:
            yield np.asarray(s.tokens[:, job.n_prompt + shown:job.n_prompt + made])
            shown = made
        if made >= max_new_tokens or bool(jnp.all(s.done_B)):
            return
        s = _decode(config, params, s, min(made + chunk, max_new_tokens), rule=job.rule)


def check_arguments(config: GPTConfig, prompt, max_new_tokens, top_k, top_p, vocab_size, prompt_lengths=None,
                    eos=()) -> None:
    try:
        shape = np.shape(prompt)
    except ValueError:  # numpy's "inhomogeneous shape"
        shape = None
    if shape is None or (isinstance(prompt, (list, tuple)) and len(shape) != 2):
        raise ValueError("generate: give the prompts as one 2-D array (batch, tokens), left-padded with "
                         "prompt_lengths, or as a list of 1-D token arrays")
    dtype = getattr(prompt, "dtype", None) or np.asarray(prompt).dtype
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
    if prompt_lengths is not None:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != shape[:1] or not jnp.issubdtype(lengths.dtype, jnp.integer) or \
                lengths.min() < 1 or lengths.max() > shape[1]:
            raise ValueError(f"generate: prompt_lengths must hold {shape[0]} int(s) in [1, {shape[1]}] (one per row "
                             f"of the prompt), not {lengths.tolist()}")
    if any(not 0 <= e < limit for e in eos):
        raise ValueError(f"generate: eos_id={list(eos)} must be token ids in [0, {limit})")
    if not isinstance(max_new_tokens, (int, np.integer)) or not 0 <= max_new_tokens < 2**31 - shape[1] - 2 * BUCKET:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an int in [0, 2**31) with the prompt")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k={top_k} must be at least 1 (None keeps every token)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1] (None keeps every token)")


def lower_programs(config: GPTConfig, params, batch: int, prompt_tokens: int, max_new_tokens: int, *, sharding,
                   temperature=1.0, top_k: int | None = None, top_p: float | None = None, eos_id=None):
    """generate's two programs for these sizes lowered with abstract arrays placed by `sharding` (`params`
    abstract too): what `nanogpt-jax compile --what=generate` compiles for a topology without running it."""
    rule = Rule(top_k, top_p, None, known_greedy(temperature), () if eos_id is None else tuple(np.atleast_1d(eos_id)))
    n_prompt = min(prompt_tokens, config.block_size)
    bucket, new_bucket = min(_round_up(n_prompt), config.block_size), _round_up(max_new_tokens)

    def abstract(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    prefill = _prefill.lower(config, params, abstract((batch, bucket), jnp.int32), n_prompt,
                             abstract((batch,), jnp.int32), abstract((2,), jnp.uint32), temperature, rule=rule,
                             new_bucket=new_bucket)
    state = jax.tree.map(lambda x: abstract(x.shape, x.dtype), prefill.out_info)
    return prefill, _decode.lower(config, params, state, max_new_tokens, rule=rule)


def compiled_programs() -> int:
    """How many generate programs have been compiled in this process (prefill and decode)."""
    return _prefill._cache_size() + _decode._cache_size()


generate._cache_size = compiled_programs  # compilations so far, as on a jitted function
