"""GPT-2 124M's first `generate` call in a fresh process: a greedy call (prompt 32, 8 new tokens),
then the same call again; their difference is about the compile time.

    python scripts/bench_first_call.py
"""

import time

import jax
import numpy as np

from nanogpt_jax import GPTConfig, generate, init_params


def main():
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=50257)
    params = jax.block_until_ready(init_params(config, jax.random.PRNGKey(0)))
    prompt = np.random.default_rng(0).integers(0, 50257, (1, 32)).astype(np.int32)
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        np.asarray(generate(config, params, prompt, 8, key=jax.random.PRNGKey(0), temperature=0.0))
        seconds.append(time.perf_counter() - t0)
    print(f"first call {seconds[0]:.2f} s, second {seconds[1]:.2f} s, "
          f"compile ~{seconds[0] - seconds[1]:.2f} s ({jax.devices()[0].device_kind})")


if __name__ == "__main__":
    main()
