"""MFU: nanoGPT's FLOP count per token, and the peak looked up for the device (none invented for CPUs)."""

import jax

from nanogpt_jax.mfu import flops_per_token, peak_flops
from nanogpt_jax.model import GPTConfig, init_params, num_params


def test_flops_per_token_is_nanogpts_estimate_for_gpt2():
    """nanoGPT's estimate_mfu for its GPT-2 124M (bias=False, vocab 50304): N = 123,587,328 non-embedding
    parameters (what nanoGPT prints as 123.59M), 6N + 12 L H Q T = 854,770,176 FLOPs per token."""
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=False)
    n = num_params(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
    assert n == 123_587_328
    assert flops_per_token(config, n) == 854_770_176


def test_peak_is_per_device_and_dtype_and_unknown_for_cpu():
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12  # nanoGPT's hard-coded A100 figure
    assert peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 156e12  # TF32
    assert peak_flops("TPU v4", "bfloat16") == 275e12
    # per JAX device: a v2 / v3 chip is two devices (45 and 123 TFLOP/s per chip)
    assert (peak_flops("TPU v2", "bfloat16"), peak_flops("TPU v3", "bfloat16")) == (22.5e12, 61.5e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops(jax.devices("cpu")[0].device_kind, "float32") is None
