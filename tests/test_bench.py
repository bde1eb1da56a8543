"""The benchmarks' smallest cases run and report consistent numbers (never timed against a threshold): this keeps
scripts/benchmarks/, its `--compare=torch` references and scripts/bench.py working."""

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import nanogpt_num_params
from benchmarks import case
from benchmarks.case import bench, side_args
from benchmarks.presets import DECODE_SHAPES, TRAIN_SHAPES, BenchConfig, shaped
from benchmarks.probes import allocator
from benchmarks.reference import torch_gpt
from nanogpt_jax.config import parse, run_config_file
from nanogpt_jax.model import GPTConfig, init_params, make_model

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, dtype="float32")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def positive(x) -> bool:
    return math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_train_smallest_case():
    """One timed step of a 1-layer model: finite positive ms and tokens/s that agree with each other, the
    batch and parameter count of the options given, FLOPs of nanoGPT's formula."""
    t0 = time.perf_counter()
    r = bench(BenchConfig(bench="train", steps=1, rounds=1, batch_size=2, gradient_accumulation_steps=2, **TINY))
    wall_s = time.perf_counter() - t0
    assert (r["bench"], r["batch"], r["micro_batch"], r["devices"]) == ("train", "2x2x8", 2, 1)
    assert positive(r["ms_per_iter"]) and positive(r["tokens_per_sec"]) and positive(r["compile_s"])
    assert r["compile_s"] + r["ms_per_iter"] / 1000 < wall_s  # both were timed inside the call, apart
    n = nanogpt_num_params(11, 8, 1, 16, bias=False)
    assert r["params_M"] * 1e6 == pytest.approx(n)
    assert r["flops_per_iter_formula"] == (6 * n + 12 * 1 * 2 * 8 * 8) * 2 * 2 * 8  # nanoGPT's estimate_mfu
    assert positive(r["flops_per_iter_xla"]) and math.isfinite(r["loss"])
    assert r["device"] == jax.devices()[0].device_kind and positive(r["peak_rss_gb"])
    maps = Path("/proc/self/maps").read_text()
    assert r["malloc"] == ("tcmalloc" if "libtcmalloc" in maps else "jemalloc" if "libjemalloc" in maps else "glibc")


def test_allocator_is_read_from_the_mapped_libraries():
    line = "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/{}\n"
    glibc = line.format("libc.so.6")
    assert allocator(glibc) == "glibc"
    assert allocator(glibc + line.format("libtcmalloc_minimal.so.4")) == "tcmalloc"
    assert allocator(glibc + line.format("libjemalloc.so.2")) == "jemalloc"


@pytest.mark.slow
def test_bench_compare_torch_smallest_case():
    """--compare=torch at a tiny shape: both sides report finite positive times within their rounds' spread,
    losses near ln(vocab) (both train the same-shaped model from a fresh init), and each side's memory from
    a fresh process of its own."""
    r = bench(BenchConfig(bench="train", steps=2, rounds=2, batch_size=2, gradient_accumulation_steps=2,
                          compare="torch", **TINY))
    t = r["torch"]
    assert t["name"] == "torch eager, nanoGPT's GPT" and len(t["rounds_ms"]) == len(r["rounds_ms"]) == 2
    for side in (r, t):
        assert positive(side["ms_per_iter"]) and positive(side["compile_s"]) and positive(side["tflops_per_sec"])
        assert min(side["rounds_ms"]) <= side["ms_per_iter"] <= max(side["rounds_ms"])
        assert abs(side["loss"] - math.log(11)) < 0.5
        assert positive(side["step_peak_gb"]) and positive(side["setup_peak_gb"])
        assert side["mfu"] is None  # no table peak for a CPU


def test_bench_generate_smallest_case():
    """generate of 4 tokens for 2 rows: finite positive time and tokens/s, the model's size as nanoGPT counts it."""
    r = bench(BenchConfig(bench="generate", new_tokens=4, num_samples=2, repeats=1, rounds=1, **TINY))
    assert (r["bench"], r["batch"], r["new_tokens"], r["block_size"]) == ("generate", 2, 4, 8)
    assert positive(r["ms_per_call"]) and positive(r["tokens_per_sec"])
    assert r["params_M"] * 1e6 == pytest.approx(nanogpt_num_params(11, 8, 1, 16, bias=False))


@pytest.mark.slow
def test_bench_compare_decoding_gives_transformers_tokens(monkeypatch):
    """Greedy decoding compared with transformers' generate on the same weights (ours copied into the HF model,
    a bias=False model's biases as zeros): the very same tokens. (The fresh memory processes are covered by
    the train comparison above; here each side's memory is left out.)"""
    monkeypatch.setattr(case, "fresh_process_memory", lambda cfg, side, n: {})
    tiny = {**TINY, "block_size": 32, "vocab_size": 50}
    for bias in (True, False):
        r = bench(BenchConfig(bench="generate", compare="torch", prompt_tokens=5, new_tokens=20, num_samples=3,
                              temperature=0.0, repeats=1, rounds=1, bias=bias, **tiny))
        assert r["same_tokens"] is True and r["first_different_token"] is None
        assert positive(r["tokens_per_sec"]) and positive(r["torch"]["tokens_per_sec"])


def test_side_args_give_back_the_same_case():
    """The options a one-side memory process gets parse back to the case itself (one round, at most 2 steps)."""
    cfg = BenchConfig(bench="train", compare="torch", steps=5, rounds=3, attn_impl=None, **TINY)
    again = parse(BenchConfig, side_args(cfg, "torch", 2))
    expected = {**cfg.__dict__, "side": "torch", "steps": 2, "rounds": 1, "repeats": 1, "num_devices": 2}
    assert {k: v for k, v in again.__dict__.items() if not k.startswith("_")} == expected


@pytest.mark.parametrize("shape, config", [("baby", "shakespeare_char_cpu.py"), ("char", "shakespeare_char.py")])
def test_train_shapes_are_the_recipes(shape, config):
    """--shape=baby and --shape=char are nanoGPT's CPU and char recipes, as their config files write them."""
    recipe = run_config_file(str(CONFIGS / config))
    recipe.setdefault("bias", False)  # nanoGPT's default
    recipe["vocab_size"] = 65  # Tiny Shakespeare's characters
    assert {k: recipe[k] for k in TRAIN_SHAPES[shape]} == TRAIN_SHAPES[shape]


def test_shape_preset_yields_to_given_options():
    """A preset fills what the user did not set; what they set stays."""
    cfg = parse(BenchConfig, ["--bench=generate", "--shape=gpt2", "--num_samples=8", "--new_tokens=16"])
    got = shaped(cfg)
    assert (got.n_layer, got.n_embd, got.vocab_size, got.prompt_tokens) == (12, 768, 50257, 32)
    assert (got.num_samples, got.new_tokens, got.temperature) == (8, 16, 0.0)
    assert DECODE_SHAPES["gpt2"]["bias"] is True


@pytest.mark.parametrize("bias", [False, True])
def test_the_torch_training_reference_computes_our_model(bias):
    """torch_gpt holding our weights gives our logits (float32), with and without biases: the training
    reference times the same function."""
    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, bias=bias)
    params = init_params(config, jax.random.PRNGKey(0))
    idx_BT = np.random.default_rng(0).integers(0, 50, (3, 16))
    ours_BTV, _ = make_model(config).apply({"params": params}, jnp.asarray(idx_BT))
    names = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    state = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        *module, leaf = [str(getattr(k, "key", k)) for k in path]
        x = np.asarray(x)
        layers = enumerate(x) if module[0] == "h" else [(None, x)]
        for n, value in layers:
            name = ".".join(["h", str(n), *module[1:]] if n is not None else module) + "." + names[leaf]
            state[name] = torch.from_numpy(np.ascontiguousarray(value.T if leaf == "kernel" else value))
    model = torch_gpt(config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        theirs_BTV = model(torch.from_numpy(idx_BT)).numpy()
    np.testing.assert_allclose(theirs_BTV, np.asarray(ours_BTV), atol=2e-5, rtol=1e-4)
