"""Model FLOPs utilisation against the device's own peak: nanoGPT's FLOP count, a table of known chips."""

from .model import GPTConfig

# Dense peak FLOP/s per JAX device by `device_kind`, for (bfloat16/float16, float32) matmuls: what one
# device of jax.devices() can do, so that MFU = achieved / (peak x devices). float32 on NVIDIA counts TF32
# tensor cores (JAX's default matmul precision there), half the bf16 rate; a TPU multiplies float32 in bf16
# passes by default, so both entries are its bf16 rate. No CPU entry: a CPU's peak depends on the exact
# part and clock, and a guessed number would mislead.
PEAK_FLOPS = {
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100/): SXM 989 TFLOPS bf16 dense (1,979 is
    # with 2:4 sparsity), TF32 494; PCIe 756 / 378.
    "NVIDIA H100 80GB HBM3": (989e12, 494e12),
    "NVIDIA H100 PCIe": (756e12, 378e12),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200/): H200 SXM 989 bf16 dense, the H100's core.
    "NVIDIA H200": (989e12, 494e12),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100/): 312 bf16 dense, TF32 156; nanoGPT's figure.
    "NVIDIA A100-SXM4-80GB": (312e12, 156e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 156e12),
    "NVIDIA A100 80GB PCIe": (312e12, 156e12),
    # NVIDIA L4 datasheet: 121 bf16 dense.
    "NVIDIA L4": (121e12, 60e12),
    # Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v2 ... /v6e), bf16 per chip. v2 and v3
    # chips hold two TensorCores, each its own JAX device: v2 45 per chip = 22.5 per device, v3 123 per
    # chip = 61.5 per device. v4 and v5p chips are one device (megacore): 275 and 459. v5e ("TPU v5 lite")
    # 197 and v6e Trillium ("TPU v6 lite") 918: one core, one device per chip.
    "TPU v2": (22.5e12, 22.5e12),
    "TPU v3": (61.5e12, 61.5e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5": (459e12, 459e12),
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
