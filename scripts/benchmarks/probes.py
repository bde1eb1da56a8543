"""What a benchmark reads of its own process: RSS and its peak (Linux /proc), the malloc it runs on, and the
FLOP/s and MFU of a measured time."""

from pathlib import Path

import jax

from nanogpt_jax import mfu


def _proc_status_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or since reset_peak_rss) of this process, GB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_gb() -> float:
    return _proc_status_gb("VmHWM")


def rss_gb() -> float:
    return _proc_status_gb("VmRSS")


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux's clear_refs): the peak after this excludes compiling."""
    Path("/proc/self/clear_refs").write_text("5")


def allocator(maps: str | None = None) -> str:
    """The malloc this process runs on: 'tcmalloc' or 'jemalloc' when one is preloaded (its library is mapped),
    else 'glibc'. It matters on a CPU: XLA:CPU allocates each step's scratch memory afresh, which glibc maps from
    the kernel every time (docs/benchmarks.md)."""
    maps = Path("/proc/self/maps").read_text() if maps is None else maps
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "glibc")


def flops_report(flops_per_iter: float, seconds: float, dtype: str, devices: int) -> dict:
    """Achieved FLOP/s and MFU against the devices' table peak (None where there is none: CPUs)."""
    peak = mfu.peak_flops(jax.devices()[0].device_kind, dtype)
    achieved = flops_per_iter / seconds
    return {"tflops_per_sec": achieved / 1e12, "mfu": achieved / (peak * devices) if peak else None}
