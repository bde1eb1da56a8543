"""One benchmark case, measured: the sides set up, timed round by round alternately, and reported (one dict,
printed as one JSON line by scripts/bench_case.py)."""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from nanogpt_jax import mfu, parallel
from nanogpt_jax.config import ConfigError
from nanogpt_jax.load import abstract_params, model_config
from nanogpt_jax.model import init_params, num_params

from .ours import OursDecode, OursTrain
from .presets import BenchConfig, backend, shaped
from .probes import allocator, flops_report, peak_rss_gb, reset_peak_rss, rss_gb
from .reference import TorchDecode, TorchTrain, torch_modules

BENCH_CASE = Path(__file__).resolve().parent.parent / "bench_case.py"
TORCH_SIDES = ("torch", "torch.compile")  # --side values of the references: eager, compiled


def alternate(sides: list, rounds: int, n: int) -> dict[str, list[float]]:
    """Seconds per iteration of each side, round by round: side 1, side 2, ..., then again; after an untimed
    warm-up of min(n, 3) iterations each (the first steps after compiling run up to 2x slower: first-touch
    page faults, thread pools waking; with them in a short sample `bench` reads slower than `train`)."""
    for side in sides:
        side(min(n, 3))
    times = {side.name: [] for side in sides}
    for _ in range(rounds):
        for side in sides:
            times[side.name].append(side(n))
    return times


def side_report(side, seconds: list[float], work: float, flops: float, dtype: str, devices: int,
                unit: str) -> dict:
    """The figures of one side: median time per iteration, its rounds' spread, and what follows from it."""
    dt = statistics.median(seconds)
    r = {"name": side.name, f"ms_per_{unit}": dt * 1000, "tokens_per_sec": work / dt,
         "rounds_ms": [round(s * 1000, 3) for s in seconds], "compile_s": side.compile_s}
    if flops:
        r.update(flops_per_iter=flops, **flops_report(flops, dt, dtype, devices))
    if hasattr(side, "loss"):
        r["loss"] = side.loss
    gb = side.peak_device_gb()
    if gb is not None:
        r["peak_device_gb"] = gb
    return r


def side_memory(start_rss: float, setup_peak: float) -> dict:
    """A one-side process's memory above its RSS before the model was built: the peak while it ran its
    steps (state, compiled program and the steps' own buffers), and the peak while it set up (compiling)."""
    return {"step_peak_gb": peak_rss_gb() - start_rss, "setup_peak_gb": setup_peak - start_rss}


def side_args(cfg: BenchConfig, side: str, num_devices: int) -> list[str]:
    """The command-line options of `cfg` for a process that runs `side` alone, 2 steps, one round."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields.update(side=side, shape=None, steps=min(cfg.steps, 2), repeats=1, rounds=1, num_devices=num_devices)
    return [f"--{k}={v!r}" for k, v in fields.items()]


def fresh_process_memory(cfg: BenchConfig, side: str, num_devices: int) -> dict:
    """Run one side alone in a fresh process: its memory as side_memory measures it."""
    proc = subprocess.run([sys.executable, str(BENCH_CASE), *side_args(cfg, side, num_devices)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench --side={side} failed: {proc.stderr.strip()[-2000:]}")
    r = json.loads(lines[-1])
    return {"step_peak_gb": r["step_peak_gb"], "setup_peak_gb": r["setup_peak_gb"]}


def add_memory(cfg: BenchConfig, result: dict, devices: int) -> None:
    """Each side's peak memory: fresh processes on a CPU (RSS), the in-process device peaks on a GPU."""
    if backend() != "cpu":
        result["memory"] = "peak device allocation of each library, one process"
        return
    result.update(fresh_process_memory(cfg, "ours", devices))
    for variant in result["torch_variants"].values():
        variant.update(fresh_process_memory(cfg, variant["side"], devices))  # result["torch"] is one of them
    result["memory"] = "fresh process per side: peak RSS above its start while stepping / while setting up"


def sides_wanted(cfg: BenchConfig) -> tuple[str, ...]:
    """The --side values this run times: one side alone, or ours and the references asked for."""
    if cfg.side != "both":
        return (cfg.side,)
    if not cfg.compare:
        return ("ours",)
    return ("ours", *TORCH_SIDES) if cfg.torch_compile or backend() == "gpu" else ("ours", "torch")


def torch_sides(wanted, make) -> tuple[list, str | None]:
    """The references among `wanted`, set up by make(compiled); torch.compile needs a C compiler (and Triton
    on a GPU): where it fails, eager still compares and the error is reported."""
    sides, error = [], None
    for side in TORCH_SIDES:
        if side in wanted:
            try:
                sides.append(make(side == "torch.compile"))
            except Exception as e:
                if side == "torch" or len(wanted) == 1:
                    raise
                error = f"{type(e).__name__}: {e}"[:500]
            else:
                sides[-1].side = side
    return sides, error


def compared(result: dict, reports: dict, sides: list, faster) -> None:
    """The references' reports under result["torch_variants"], the faster one (by `faster`) as result["torch"]."""
    theirs = [{**reports[s.name], "side": s.side} for s in sides if hasattr(s, "side")]
    result["torch_variants"] = {r["name"]: r for r in theirs}
    result["torch"] = faster(theirs)


def bench_train(cfg: BenchConfig) -> dict:
    """ms per optimizer step of ours (and the torch references), with FLOPs, MFU and memory."""
    wanted = sides_wanted(cfg)
    if set(wanted) & set(TORCH_SIDES):
        torch_modules()  # imported before the RSS baseline: imports are no side's memory
    config = model_config(cfg, cfg.vocab_size)
    layout = parallel.plan(cfg.gradient_accumulation_steps, cfg.batch_size, cfg.micro_batch_size, fsdp=cfg.fsdp,
                           num_devices=cfg.num_devices)
    n_params = num_params(abstract_params(config))
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    formula = mfu.flops_per_token(config, n_params) * tokens
    start_rss = rss_gb()
    with tempfile.TemporaryDirectory() as tmp:
        sides = [OursTrain(cfg, tmp)] if "ours" in wanted else []
        theirs, compile_error = torch_sides(
            wanted, lambda compiled: TorchTrain(cfg, config, layout.steps, layout.rows, compiled=compiled))
        sides += theirs
        setup_peak = peak_rss_gb()
        if cfg.side != "both":
            reset_peak_rss()
        times = alternate(sides, cfg.rounds, cfg.steps)
    reports = {s.name: side_report(s, times[s.name], tokens, formula, config.dtype, layout.devices, "iter")
               for s in sides}
    result = {"bench": "train", "shape": cfg.shape, "params_M": n_params / 1e6, "devices": layout.devices,
              "batch": f"{cfg.gradient_accumulation_steps}x{cfg.batch_size}x{cfg.block_size}",
              "micro_batch": layout.rows, "micro_steps": layout.steps, "dtype": config.dtype,
              "flops_per_iter_formula": formula}
    if "ours" in wanted and sides[0].xla_flops is not None:
        result["flops_per_iter_xla"] = sides[0].xla_flops
    if cfg.side != "both":  # a fresh process measuring one side's memory
        return {**result, **reports[sides[0].name], **side_memory(start_rss, setup_peak)}
    result.update(reports.pop("ours"), peak_rss_gb=peak_rss_gb())
    result.pop("name")
    if cfg.compare:
        compared(result, reports, sides, lambda rs: min(rs, key=lambda r: r["ms_per_iter"]))
        if compile_error:
            result["torch_compile_error"] = compile_error
        result["ratio"] = result["torch"]["ms_per_iter"] / result["ms_per_iter"]  # > 1: ours is faster
        add_memory(cfg, result, layout.devices)
    return result


def same_tokens(ours, theirs, prompt_tokens: int) -> dict:
    """Whether two sides' greedy new tokens are identical, and where they first differ."""
    differ = np.nonzero((ours[:, prompt_tokens:] != theirs[:, prompt_tokens:]).any(axis=0))[0]
    return {"same_tokens": differ.size == 0, "first_different_token": int(differ[0]) if differ.size else None}


def bench_generate(cfg: BenchConfig) -> dict:
    """Tokens per second of `generate` (new tokens of all rows / wall time), after compilation; with
    --compare=torch, greedy against transformers' generate on the same weights (eager, and compiled with a
    static cache under --torch_compile: the faster counts)."""
    if cfg.compare and cfg.temperature != 0:
        raise ConfigError("the decoding comparison is greedy: pass --temperature=0 (or a --shape)")
    if cfg.compare and cfg.prompt_tokens + cfg.new_tokens > cfg.block_size:
        raise ConfigError(f"--prompt_tokens + --new_tokens = {cfg.prompt_tokens + cfg.new_tokens} is beyond "
                          f"--block_size={cfg.block_size}: transformers' generate does not crop the context")
    wanted = sides_wanted(cfg)
    if set(wanted) & set(TORCH_SIDES):
        torch_modules()
    jax.devices()
    start_rss = rss_gb()
    config = model_config(cfg, cfg.vocab_size)
    params = init_params(config, jax.random.PRNGKey(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (cfg.num_samples, cfg.prompt_tokens)).astype(np.int32)
    sides = [OursDecode(cfg, config, params, prompt)] if "ours" in wanted else []
    theirs, compile_error = torch_sides(
        wanted, lambda compiled: TorchDecode(cfg, config, params, prompt, compiled=compiled))
    sides += theirs
    setup_peak = peak_rss_gb()
    if cfg.side != "both":
        reset_peak_rss()
    times = alternate(sides, cfg.rounds, cfg.repeats)
    work = cfg.num_samples * cfg.new_tokens
    reports = {s.name: side_report(s, times[s.name], work, 0.0, config.dtype, 1, "call") for s in sides}
    result = {"bench": "generate", "shape": cfg.shape, "params_M": num_params(params) / 1e6,
              "batch": cfg.num_samples, "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
              "block_size": config.block_size, "temperature": cfg.temperature, "dtype": config.dtype}
    if cfg.side != "both":
        return {**result, **reports[sides[0].name], **side_memory(start_rss, setup_peak)}
    result.update(reports.pop("ours"), peak_rss_gb=peak_rss_gb())
    result.pop("name")
    if cfg.compare:
        for side in sides[1:]:
            reports[side.name].update(same_tokens(sides[0].tokens, side.tokens, cfg.prompt_tokens))
        compared(result, reports, sides, lambda rs: max(rs, key=lambda r: r["tokens_per_sec"]))
        if compile_error:
            result["torch_compile_error"] = compile_error
        result["ratio"] = result["tokens_per_sec"] / result["torch"]["tokens_per_sec"]  # > 1: ours is faster
        result.update(same_tokens=result["torch"]["same_tokens"],
                      first_different_token=result["torch"]["first_different_token"])
        add_memory(cfg, result, 1)
    return result


def bench(cfg: BenchConfig) -> dict:
    """One case, measured: the result as a dict."""
    cfg = shaped(cfg)
    load_before = os.getloadavg()[0]
    result = {"train": bench_train, "generate": bench_generate}[cfg.bench](cfg)
    result["device"] = jax.devices()[0].device_kind
    result["malloc"] = allocator()
    # Other work on the machine slows both sides, torch's spinning OpenMP threads most: say how busy it was.
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result
