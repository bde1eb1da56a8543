"""Model FLOPs utilisation against the device's own peak: nanoGPT's FLOP count, a table of known chips."""

from .model import GPTConfig

# Dense peak FLOP/s per device by jax `device_kind`, for (bfloat16/float16, float32) matmuls.
# float32 on NVIDIA counts TF32 tensor cores (JAX's default matmul precision there). No CPU entry:
# a CPU's peak depends on the exact part and clock, and a guessed number would mislead.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": (989e12, 494e12),
    "NVIDIA H100 PCIe": (756e12, 378e12),
    "NVIDIA H200": (989e12, 494e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 156e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 156e12),
    "NVIDIA A100 80GB PCIe": (312e12, 156e12),
    "NVIDIA L4": (121e12, 60e12),
    "TPU v2": (45e12, 45e12),
    "TPU v3": (123e12, 123e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),
    "TPU v6e": (918e12, 918e12),
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    peaks = PEAK_FLOPS.get(device_kind)
    if peaks is None:
        return None
    return peaks[1] if dtype == "float32" else peaks[0]


def flops_per_token(config: GPTConfig, n_params: int) -> float:
    """Forward + backward FLOPs per token, as nanoGPT's estimate_mfu: 6N + 12 L H Q T."""
    L, H, T = config.n_layer, config.n_head, config.block_size
    Q = config.n_embd // max(H, 1)
    return 6 * n_params + (12 * L * H * Q * T if config.model == "gpt" else 0)
