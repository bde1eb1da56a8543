"""Prompts of different lengths in one `generate` call against one call per prompt: GPT-2 124M's
shape, random weights, greedy, 8 prompts of 5 to 60 tokens, N new tokens each.

    python scripts/bench_ragged.py [--new_tokens=64] [--rounds=3] [--scan_layers]

Both ways are compiled first (the single calls share one program: their prompts fall in one bucket), then
timed alternately, round by round; each row of the batch is checked equal to its single call.
"""

import argparse
import dataclasses
import time

import jax
import numpy as np

from nanogpt_jax import GPTConfig, generate, init_params
from benchmarks.presets import DECODE_SHAPES


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scan_layers", action="store_true")
    args = parser.parse_args()
    shape = {k: v for k, v in DECODE_SHAPES["gpt2"].items() if k in {f.name for f in dataclasses.fields(GPTConfig)}}
    config = GPTConfig(**shape, scan_layers=args.scan_layers)
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in rng.integers(5, 61, 8)]
    options = dict(key=jax.random.PRNGKey(0), temperature=0.0)

    def batched():
        return generate(config, params, prompts, args.new_tokens, **options)

    def single():
        return [np.asarray(generate(config, params, p[None], args.new_tokens, **options))[0] for p in prompts]

    for a, b in zip(batched(), single()):  # also compiles both
        np.testing.assert_array_equal(a, b)
    times = {"one batch of 8": [], "8 single calls": []}
    for _ in range(args.rounds):
        for name, fn in (("one batch of 8", batched), ("8 single calls", single)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    work = len(prompts) * args.new_tokens
    print(f"prompt lengths {[len(p) for p in prompts]}, {args.new_tokens} new tokens each, "
          f"scan_layers={args.scan_layers}, {jax.devices()[0].device_kind}; rows equal: yes")
    print("| way | best s | new tok/s |\n| --- | ---: | ---: |")
    for name, t in times.items():
        print(f"| {name} | {min(t):.3f} | {work / min(t):,.0f} |")
    print(f"batch / single speed: {min(times['8 single calls']) / min(times['one batch of 8']):.2f}x")


if __name__ == "__main__":
    main()
