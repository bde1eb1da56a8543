"""Ours, as a benchmark times it: the training step as `train` runs it, and `generate`."""

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from nanogpt_jax.config import ConfigError
from nanogpt_jax.generate import generate
from nanogpt_jax.load import model_config
from nanogpt_jax.model import GPTConfig, init_params
from nanogpt_jax.run import Run
from nanogpt_jax.train import step_key

from .presets import BenchConfig, backend


def synthetic_dataset(folder: Path, vocab_size: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, vocab_size, 200_000, dtype=np.uint16).tofile(folder / f"{split}.bin")


class OursTrain:
    """The training step as `train` runs it, on random tokens."""

    name = "ours"

    def __init__(self, cfg: BenchConfig, tmp: str):
        if cfg.parallel != "mesh":
            raise ConfigError("bench times the mesh step: leave --parallel at mesh")
        synthetic_dataset(Path(tmp) / "synthetic", cfg.vocab_size)
        run_cfg = dataclasses.replace(cfg, data_dir=tmp, dataset="synthetic")
        self.config = model_config(run_cfg, cfg.vocab_size)
        self.run = run = Run(run_cfg, self.config)
        self.state = run.init_state(init_params(self.config, jax.random.PRNGKey(0)))
        self.key, self.it = jax.random.PRNGKey(0), 0
        t0 = time.perf_counter()
        compiled = run.step.lower(self.state, run.train_batch(0), self.key).compile()
        self.compile_s = time.perf_counter() - t0
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis  # a list in older JAX
        # The program is SPMD: its cost analysis counts one device's share. On a GPU the matmuls and the
        # attention are cuBLAS/cuDNN calls the analysis does not count (it read 0.07x the formula on an H200).
        self.xla_flops = analysis.get("flops", 0.0) * run.layout.devices if backend() != "gpu" else None
        self.step = compiled
        # One step now, as TorchTrain's setup takes one: on a GPU each library then holds its step's memory
        # before the other sets up (torch first left JAX no room for gpt2 at 32 x 1024 on an 80 GB H100).
        self(1)

    def __call__(self, n: int) -> float:
        """Seconds per step over n steps, pipelined as train's loop is."""
        run, in_flight = self.run, None
        t0 = time.perf_counter()
        for _ in range(n):
            self.state, loss = self.step(self.state, run.train_batch(self.it), step_key(self.key, self.it))
            jax.block_until_ready(in_flight)
            in_flight, self.it = loss, self.it + 1
        self.loss = float(in_flight)
        return (time.perf_counter() - t0) / n

    def peak_device_gb(self) -> float | None:
        stats = jax.devices()[0].memory_stats() if backend() == "gpu" else None
        return stats["peak_bytes_in_use"] / 1e9 if stats else None


class OursDecode:
    """`generate` as a caller runs it: one call per repeat, tokens back on the host."""

    name = "ours"

    def __init__(self, cfg: BenchConfig, config: GPTConfig, params, prompt):
        self.args = (config, params, prompt, cfg.new_tokens)
        self.kw = dict(key=jax.random.PRNGKey(0), temperature=cfg.temperature,
                       top_k=200 if cfg.temperature > 0 else None)
        t0 = time.perf_counter()
        self.tokens = np.asarray(generate(*self.args, **self.kw))
        self.compile_s = time.perf_counter() - t0

    def __call__(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            jax.block_until_ready(generate(*self.args, **self.kw))
        return (time.perf_counter() - t0) / n

    def peak_device_gb(self) -> float | None:
        return OursTrain.peak_device_gb(self)
