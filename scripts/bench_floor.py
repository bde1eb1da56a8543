"""The floors under GPT-2 124M's CPU speed: how fast this machine runs, in XLA (as nanogpt-jax's
step and generate do) and in torch, the dense products those steps are made of, and nothing else.

    python scripts/bench_floor.py [--rounds=7]

Training: every dense product of one step at `scripts/bench_case.py --shape=gpt2` (2 x 1024 rows, float32),
forward and both backward products (x @ W, dY @ W^T, X^T @ dY) of the four layer matrices times 12 layers,
and of the tied lm_head (wte, 50304 x 768). Attention's own products, the softmax, GELU, layer norms, Adam
and the gradient all-reduce are left out, so the total is a lower bound on a step's time with that library's
kernels. Each product is timed alone on both cores (XLA: one device, its intra-op threads; torch: 2
threads), the two libraries alternating round by round. The fastest round counts: a floor drawn from each
library's best moment on a noisy machine is the most generous one.

Decoding: a token's weight products at batch B (`--bench=generate --shape=gpt2`): (B, 768) through each
layer's c_attn, c_proj, c_fc and mlp c_proj, then the (B, 768) x (768, 50257) logits, with distinct weights
(495 MB in float32), so they stream from memory as in a real decode step. XLA runs the chain as one jitted
function, torch as its eager loop. B / its time is the most tokens per second that library's kernels allow.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.presets import DECODE_SHAPES, TRAIN_ROWS, TRAIN_SHAPES

GPT2 = TRAIN_SHAPES["gpt2"]  # the shapes `bench --shape=gpt2` times on a CPU
N_LAYER, C, V_TRAIN, V_DECODE = GPT2["n_layer"], GPT2["n_embd"], GPT2["vocab_size"], DECODE_SHAPES["gpt2"]["vocab_size"]
ROWS = TRAIN_ROWS["cpu"]["gpt2"][0] * GPT2["block_size"]
LAYER = {"c_attn": (C, 3 * C), "attn.c_proj": (C, C), "c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_alternating(jax_fn, torch_fn, rounds: int) -> tuple[float, float]:
    """The fastest round's seconds of each, the two alternating; one warm-up call each first."""
    jax_fn(), torch_fn()
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(timed(jax_fn))
        theirs.append(timed(torch_fn))
    return min(ours), min(theirs)


def training_products():
    """(name, count per step, x shape, w shape, form) for every dense product of one gpt2 step; forms:
    'fwd' x @ w, 'dx' x @ w.T, 'dw' x.T @ w, with x and w the operands as the step holds them."""
    out = []
    for name, (cin, cout) in LAYER.items():
        out += [(f"{name} forward", N_LAYER, (ROWS, cin), (cin, cout), "fwd"),
                (f"{name} input grad", N_LAYER, (ROWS, cout), (cin, cout), "dx"),
                (f"{name} weight grad", N_LAYER, (ROWS, cin), (ROWS, cout), "dw")]
    return out + [("lm_head forward", 1, (ROWS, C), (V_TRAIN, C), "dx"),
                  ("lm_head input grad", 1, (ROWS, V_TRAIN), (V_TRAIN, C), "fwd"),
                  ("lm_head weight grad", 1, (ROWS, V_TRAIN), (ROWS, C), "dw")]


FORMS = {"fwd": lambda x, w: x @ w, "dx": lambda x, w: x @ w.T, "dw": lambda x, w: x.T @ w}  # jax and torch alike


def training_table(rounds: int) -> None:
    rng = np.random.default_rng(0)
    print(f"Training: the dense products of one GPT-2 124M step, {ROWS} rows, float32, best of {rounds} rounds\n")
    print("| product | per step | GFLOP each | XLA ms | XLA GFLOP/s | torch ms | torch GFLOP/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    totals = np.zeros(2)
    flops = 0.0
    for name, count, xs, ws, form in training_products():
        x, w = (rng.standard_normal(s, dtype=np.float32) for s in (xs, ws))
        fj, ft = jax.jit(FORMS[form]), FORMS[form]
        xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)
        t_jax, t_torch = best_alternating(lambda: fj(xj, wj).block_until_ready(), lambda: ft(xt, wt), rounds)
        out_shape = jax.eval_shape(FORMS[form], xj, wj).shape
        contracted = xs[0] if form == "dw" else xs[1]
        gflop = 2 * contracted * out_shape[0] * out_shape[1] / 1e9
        totals += count * np.array([t_jax, t_torch])
        flops += count * gflop
        print(f"| {name} | {count} | {gflop:.1f} | {t_jax * 1e3:.1f} | {gflop / t_jax:.0f} | {t_torch * 1e3:.1f} "
              f"| {gflop / t_torch:.0f} |", flush=True)
    print(f"| **all dense products** | | {flops:.0f} | **{totals[0] * 1e3:,.0f}** | {flops / totals[0]:.0f} "
          f"| **{totals[1] * 1e3:,.0f}** | {flops / totals[1]:.0f} |\n")


def decode_table(rounds: int, batches=(1, 8)) -> None:
    rng = np.random.default_rng(0)
    shapes = [s for _ in range(N_LAYER) for s in LAYER.values()] + [(C, V_DECODE)]
    weights = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in shapes]
    mb = sum(w.nbytes for w in weights) / 1e6
    wj, wt = [jnp.asarray(w) for w in weights], [torch.from_numpy(w) for w in weights]

    def chain_jax(x, ws):  # each product's input is the last output cut or tiled to its width: data dependent
        for w in ws:
            x = jnp.resize(x, (x.shape[0], w.shape[0])) @ w
        return x

    def chain_torch(x):
        with torch.no_grad():
            for w in wt:
                x = x.repeat(1, -(-w.shape[0] // x.shape[1]))[:, :w.shape[0]] @ w
        return x

    run_jax = jax.jit(chain_jax)
    print(f"Decoding: a token's weight products, GPT-2 124M, {mb:.0f} MB of float32 weights, "
          f"best of {rounds} rounds\n")
    print("| batch | XLA ms | XLA GB/s | XLA tok/s ceiling | torch ms | torch GB/s | torch tok/s ceiling |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in batches:
        x = rng.standard_normal((b, C), dtype=np.float32)
        xj, xt = jnp.asarray(x), torch.from_numpy(x)
        t_jax, t_torch = best_alternating(lambda: run_jax(xj, wj).block_until_ready(), lambda: chain_torch(xt),
                                            rounds)
        print(f"| {b} | {t_jax * 1e3:.1f} | {mb / 1e3 / t_jax:.1f} | {b / t_jax:.0f} | {t_torch * 1e3:.1f} "
              f"| {mb / 1e3 / t_torch:.1f} | {b / t_torch:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads\n")
    training_table(args.rounds)
    decode_table(args.rounds)


if __name__ == "__main__":
    main()
