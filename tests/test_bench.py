"""The benchmarks' smallest cases run and report consistent numbers (never timed against a threshold): this keeps
`nanogpt-jax bench` and scripts/bench.py working."""

import math

import jax
import pytest

from conftest import nanogpt_num_params
from nanogpt_jax.bench import bench
from nanogpt_jax.config import BenchConfig

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, dtype="float32")


def positive(x) -> bool:
    return math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_train_smallest_case():
    """One timed step of a 1-layer model: finite positive ms and tokens/s that agree with each other, the
    batch and parameter count of the options given."""
    r = bench(BenchConfig(bench="train", steps=1, batch_size=2, gradient_accumulation_steps=2, **TINY))
    assert (r["bench"], r["batch"], r["micro_batch"], r["devices"]) == ("train", "2x2x8", 2, 1)
    assert positive(r["ms_per_iter"]) and positive(r["tokens_per_sec"]) and positive(r["compile_s"])
    assert r["tokens_per_sec"] * r["ms_per_iter"] / 1000 == pytest.approx(2 * 2 * 8)
    assert r["params_M"] * 1e6 == pytest.approx(nanogpt_num_params(11, 8, 1, 16, bias=False))
    assert r["device"] == jax.devices()[0].device_kind and positive(r["peak_rss_gb"])


def test_bench_generate_smallest_case():
    """generate of 4 tokens for 2 rows: finite positive tokens/s equal to rows * new tokens / time."""
    r = bench(BenchConfig(bench="generate", new_tokens=4, num_samples=2, repeats=1, **TINY))
    assert (r["bench"], r["batch"], r["new_tokens"], r["block_size"]) == ("generate", 2, 4, 8)
    assert positive(r["ms"]) and positive(r["tokens_per_sec"])
    assert r["tokens_per_sec"] * r["ms"] / 1000 == pytest.approx(2 * 4)
    assert r["params_M"] * 1e6 == pytest.approx(nanogpt_num_params(11, 8, 1, 16, bias=False))
