"""Benchmarks: the training step and `generate`, timed after compilation, with this process's peak memory.

`nanogpt-jax bench [CONFIG.py] [--key=value ...] --bench=train|generate` measures one case and prints
one JSON line; scripts/bench.py runs each case in a fresh process (so peak memory is per case) and
prints the table.
"""

import dataclasses
import resource
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from .config import BenchConfig
from .generate import generate
from .load import model_config
from .model import init_params, num_params
from .train import Run


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def bench_train(cfg: BenchConfig) -> dict:
    """ms per optimizer step on random tokens through the same Run (batching, sharding, jitted step)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "synthetic"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            rng.integers(0, cfg.vocab_size, 200_000, dtype=np.uint16).tofile(folder / f"{split}.bin")
        run_cfg = dataclasses.replace(cfg, data_dir=tmp, dataset="synthetic")
        config = model_config(run_cfg, cfg.vocab_size)
        run = Run(run_cfg, config)
        state = run.init_state(init_params(config, jax.random.PRNGKey(0)))
        key = jax.random.PRNGKey(0)
        times = []
        for it in range(cfg.steps + 1):
            batch = run.train_batch(it)
            t0 = time.perf_counter()
            state, loss = run.step(state, batch, jax.random.fold_in(key, it))
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times[1:])
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    return {"bench": "train", "params_M": num_params(run.abstract_state.params) / 1e6, "devices": run.layout.devices,
            "batch": f"{cfg.gradient_accumulation_steps}x{cfg.batch_size}x{cfg.block_size}",
            "micro_batch": run.layout.rows,
            "ms_per_iter": dt * 1000, "tokens_per_sec": tokens / dt, "compile_s": times[0],
            "peak_rss_gb": peak_rss_gb()}


def bench_generate(cfg: BenchConfig) -> dict:
    """Tokens per second of `generate` (new tokens of all rows / wall time), after compilation."""
    config = model_config(cfg, cfg.vocab_size)
    params = init_params(config, jax.random.PRNGKey(0))
    prompt = np.zeros((cfg.num_samples, 1), np.int32)
    kw = dict(key=jax.random.PRNGKey(0), temperature=0.8, top_k=200)
    jax.block_until_ready(generate(config, params, prompt, cfg.new_tokens, **kw))
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(generate(config, params, prompt, cfg.new_tokens, **kw))
        times.append(time.perf_counter() - t0)
    dt = min(times)
    return {"bench": "generate", "params_M": num_params(params) / 1e6, "batch": cfg.num_samples,
            "new_tokens": cfg.new_tokens, "block_size": config.block_size,
            "tokens_per_sec": cfg.num_samples * cfg.new_tokens / dt, "ms": dt * 1000,
            "peak_rss_gb": peak_rss_gb()}


def bench(cfg: BenchConfig) -> dict:
    """One case, measured: the result as a dict (printed as one JSON line by the command)."""
    result = {"train": bench_train, "generate": bench_generate}[cfg.bench](cfg)
    result["device"] = jax.devices()[0].device_kind
    return result
