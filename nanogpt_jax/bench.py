"""Benchmarks: the training step and `generate`, timed after compilation; with `--compare=torch`, the same
shape in PyTorch in the same process, timed round by round alternately with ours, so that a busy machine
slows both sides alike and the ratio holds.

`nanogpt-jax bench [CONFIG.py] [--shape=baby|char|gpt2|gpt2-xl] [--compare=torch] [--key=value ...]`
measures one case and prints one JSON line; scripts/bench.py prints the table.

How each side is timed:
- train, ours: as `train` runs it: the same Run (synthetic tokens, batching, sharding, jitted step), the
  next batch read while a step runs, at most two steps in flight; ms/iter = wall time of `steps` steps /
  `steps`, the median over rounds. The step is compiled ahead of time, and that executable is what runs
  (so its cost_analysis() FLOPs are the FLOPs timed).
- train, torch: transformers' GPT2LMHeadModel (SDPA attention, always with biases), torch.optim.AdamW
  with the same lr, betas, weight decay (matrices only) and clipping, the same micro-batches (rows and
  accumulation steps as ours lays them out), batches read from the same kind of synthetic tokens inside
  the timed loop as nanoGPT's get_batch. Eager on a CPU; on a GPU bf16 autocast, eager and torch.compile
  both, and the faster counts.
- generate: one call per repeat, tokens/s = rows x new tokens / wall time (prompt included). The
  comparison is greedy: ours (`generate`, temperature 0) against transformers' `generate` with its KV
  cache, on the same weights (ours copied into the HF model), and says whether the tokens are identical.
Peak memory: on a CPU, both libraries allocate from one process heap, so each side runs again in a fresh
process (`--side=ours|torch`, 2 steps) that reports its peak RSS minus its RSS before the model is built
(imports and runtime start excluded); on a GPU, each library's own peak device allocation.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import jax
import numpy as np

from . import data, mfu, parallel
from .config import BenchConfig, ConfigError, options_set
from .convert import with_zero_biases
from .generate import generate
from .load import abstract_params, model_config
from .model import GPTConfig, init_params, num_params
from .pretrained import hf_config, hf_tensors
from .train import Run

# Presets for --shape (options given on the command line or in a config file win). Train shapes: nanoGPT's
# CPU recipe (configs/shakespeare_char_cpu.py), its char recipe (configs/shakespeare_char.py), GPT-2 124M
# and 1.5B as nanoGPT trains them from scratch (no biases, vocabulary 50304). Per backend: rows per pass.
TRAIN_SHAPES = {
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, gradient_accumulation_steps=1,
                 dropout=0.0, bias=False, vocab_size=65, learning_rate=1e-3, beta2=0.99),
    "char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, gradient_accumulation_steps=1,
                 dropout=0.2, bias=False, vocab_size=65, learning_rate=1e-3, beta2=0.99),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, gradient_accumulation_steps=1,
                 dropout=0.0, bias=False, vocab_size=50304),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, gradient_accumulation_steps=1,
                    dropout=0.0, bias=False, vocab_size=50304),
}
TRAIN_ROWS = {  # backend -> shape -> (batch_size, micro_batch_size); a CPU's caches like small micro-batches
    "cpu": {"char": (64, 8), "gpt2": (2, 0)},
    "gpu": {"gpt2": (32, 0), "gpt2-xl": (8, 2)},
}
# Decoding: GPT-2 as released (biases, vocabulary 50257), random weights, prompt 32 + 128 greedy tokens.
DECODE_SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=50257,
                 prompt_tokens=32, new_tokens=128, temperature=0.0),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, bias=True, vocab_size=50257,
                    prompt_tokens=32, new_tokens=128, temperature=0.0),
}
GPU_ONLY = {"gpt2-xl"}


def backend() -> str:
    return "cpu" if jax.default_backend() == "cpu" else "gpu"


def shaped(cfg: BenchConfig) -> BenchConfig:
    """cfg with its --shape preset filled in under the options the user set."""
    if cfg.shape is None:
        return cfg
    table = DECODE_SHAPES if cfg.bench == "generate" else TRAIN_SHAPES
    if cfg.shape not in table:
        raise ConfigError(f"--shape={cfg.shape} for --bench={cfg.bench}: use one of {', '.join(table)}")
    if cfg.shape in GPU_ONLY and backend() == "cpu":
        raise ConfigError(f"--shape={cfg.shape} is for a GPU (this is a CPU)")
    preset = dict(table[cfg.shape])
    if cfg.bench == "train" and cfg.shape in TRAIN_ROWS[backend()]:
        preset["batch_size"], preset["micro_batch_size"] = TRAIN_ROWS[backend()][cfg.shape]
    user = options_set(cfg)
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in user})


# ------------------------------------------------------------------------------------------------ memory


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


# ------------------------------------------------------------------------------------------------ FLOP/s


def flops_report(flops_per_iter: float, seconds: float, dtype: str, devices: int) -> dict:
    """Achieved FLOP/s and MFU against the devices' table peak (None where there is none: CPUs)."""
    peak = mfu.peak_flops(jax.devices()[0].device_kind, dtype)
    achieved = flops_per_iter / seconds
    return {"tflops_per_sec": achieved / 1e12, "mfu": achieved / (peak * devices) if peak else None}


# ------------------------------------------------------------------------------------------- ours: train


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
            self.state, loss = self.step(self.state, run.train_batch(self.it), jax.random.fold_in(self.key, self.it))
            jax.block_until_ready(in_flight)
            in_flight, self.it = loss, self.it + 1
        self.loss = float(in_flight)
        return (time.perf_counter() - t0) / n

    def peak_device_gb(self) -> float | None:
        stats = jax.devices()[0].memory_stats() if backend() == "gpu" else None
        return stats["peak_bytes_in_use"] / 1e9 if stats else None


# ------------------------------------------------------------------------------------------ torch: train


def torch_modules():
    """torch and transformers, imported only here: they are optional (the test extra)."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ConfigError("--compare=torch needs torch and transformers: pip install -e '.[test]'") from None
    return torch, transformers


def torch_device(torch) -> str:
    return "cuda" if backend() == "gpu" and torch.cuda.is_available() else "cpu"


def hf_model(config: GPTConfig, params=None):
    """transformers' GPT2LMHeadModel of config's shape (SDPA attention; HF GPT-2 always has biases), holding
    `params` when given (a bias=False model's biases as zeros: the same function)."""
    torch, transformers = torch_modules()
    cfg = transformers.GPT2Config(**{**hf_config(dataclasses.replace(config, bias=True)),
                                     "bos_token_id": None, "eos_token_id": None})
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    if params is not None:
        config_b, params_b = (config, params) if config.bias else with_zero_biases(config, params)
        state = {name: torch.from_numpy(x) for name, x in hf_tensors(config_b, params_b).items()}
        model.transformer.load_state_dict(state, strict=True)
    return model


class TorchTrain:
    """nanoGPT's training step with transformers' GPT-2: micro-batch forward/backward, clip, AdamW."""

    def __init__(self, cfg: BenchConfig, config: GPTConfig, micro_steps: int, rows: int, compiled: bool):
        torch, _ = self.torch, _ = torch_modules()
        self.name = "torch.compile" if compiled else "torch eager"
        self.cfg, self.config, self.micro_steps, self.rows = cfg, config, micro_steps, rows
        self.device = torch_device(torch)
        torch.manual_seed(0)
        model = hf_model(config).to(self.device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.params = params
        self.opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                     fused=self.device == "cuda")
        self.model = torch.compile(model) if compiled else model
        self.autocast = (nullcontext() if config.dtype == "float32" else
                         torch.autocast(self.device, dtype=getattr(torch, config.dtype)))
        self.tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 200_000).astype(np.uint16)
        self.it, self.loss = 0, float("nan")
        t0 = time.perf_counter()
        self(1)  # the first step builds (or compiles) what the step needs
        self.compile_s = time.perf_counter() - t0

    def batch(self):
        torch = self.torch
        x, y = data.get_batch(self.tokens, self.config.block_size, (self.micro_steps, self.rows), (1, self.it))
        x, y = torch.from_numpy(x).long(), torch.from_numpy(y).long()
        if self.device == "cuda":
            return x.pin_memory().to("cuda", non_blocking=True), y.pin_memory().to("cuda", non_blocking=True)
        return x, y

    def __call__(self, n: int) -> float:
        torch = self.torch
        F = torch.nn.functional
        t0 = time.perf_counter()
        for _ in range(n):
            x_ABT, y_ABT = self.batch()
            for x_BT, y_BT in zip(x_ABT, y_ABT):
                with self.autocast:
                    logits = self.model(input_ids=x_BT, use_cache=False).logits
                    loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y_BT.view(-1)) / self.micro_steps
                loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.it += 1
        self.loss = loss.item() * self.micro_steps  # waits for the device
        return (time.perf_counter() - t0) / n

    def peak_device_gb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 1e9 if self.device == "cuda" else None


# ---------------------------------------------------------------------------------------------- generate


class OursDecode:
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


class TorchDecode:
    """transformers' `generate`, greedy, KV cache on, exactly new_tokens tokens (no end-of-text stop)."""

    name = "transformers generate"

    def __init__(self, cfg: BenchConfig, config: GPTConfig, params, prompt):
        torch, _ = self.torch, _ = torch_modules()
        self.device = torch_device(torch)
        model = hf_model(config, params).eval()
        if config.dtype != "float32":
            model = model.to(getattr(torch, config.dtype))
        self.model = model.to(self.device)
        self.ids = torch.from_numpy(np.asarray(prompt)).long().to(self.device)
        self.kw = dict(attention_mask=torch.ones_like(self.ids), do_sample=False, max_new_tokens=cfg.new_tokens,
                       min_new_tokens=cfg.new_tokens, pad_token_id=0, use_cache=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            self.tokens = self.model.generate(self.ids, **self.kw).cpu().numpy()
        self.compile_s = time.perf_counter() - t0

    def __call__(self, n: int) -> float:
        torch = self.torch
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                out = self.model.generate(self.ids, **self.kw)
            out.cpu()
        return (time.perf_counter() - t0) / n

    def peak_device_gb(self) -> float | None:
        return TorchTrain.peak_device_gb(self)


# ------------------------------------------------------------------------------------------------- cases


def alternate(sides: list, rounds: int, n: int) -> dict[str, list[float]]:
    """Seconds per iteration of each side, round by round: side 1, side 2, ..., then again; after an untimed
    warm-up of min(n, 3) iterations each (the first steps after compiling run up to 2x slower: first-touch
    page faults, thread pools waking; leaving them in a short sample made `bench` read slower than `train`)."""
    for side in sides:
        side(min(n, 3))
    times = {side.name: [] for side in sides}
    for _ in range(rounds):
        for side in sides:
            times[side.name].append(side(n))
    return times


def side_report(side, seconds: list[float], work: float, flops: float, dtype: str, devices: int,
                unit: str) -> dict:
    """The figures of one side: median time per iteration and what follows from it."""
    dt = statistics.median(seconds)
    r = {"name": side.name, f"ms_per_{unit}": dt * 1000, "tokens_per_sec": work / dt,
         "rounds_ms": [round(s * 1000, 3) for s in seconds], "compile_s": side.compile_s}
    if flops:
        r.update(flops_per_iter=flops, **flops_report(flops, dt, dtype, devices))
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
    proc = subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "bench", *side_args(cfg, side, num_devices)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench --side={side} failed: {proc.stderr.strip()[-2000:]}")
    r = json.loads(lines[-1])
    return {"step_peak_gb": r["step_peak_gb"], "setup_peak_gb": r["setup_peak_gb"]}


def bench_train(cfg: BenchConfig) -> dict:
    """ms per optimizer step of ours (and the torch reference), with FLOPs, MFU and memory."""
    wanted = {"both": ("ours", "torch") if cfg.compare else ("ours",), "ours": ("ours",), "torch": ("torch",)}
    wanted = wanted[cfg.side]
    if "torch" in wanted:
        torch_modules()  # imported before the RSS baseline: imports are no side's memory
    config = model_config(cfg, cfg.vocab_size)
    layout = parallel.plan(cfg.gradient_accumulation_steps, cfg.batch_size, cfg.micro_batch_size, fsdp=cfg.fsdp,
                           num_devices=cfg.num_devices)
    n_params = num_params(abstract_params(config))
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    formula = mfu.flops_per_token(config, n_params) * tokens
    start_rss, compile_error = rss_gb(), None
    with tempfile.TemporaryDirectory() as tmp:
        sides = [OursTrain(cfg, tmp)] if "ours" in wanted else []
        if "torch" in wanted:
            sides.append(TorchTrain(cfg, config, layout.steps, layout.rows, compiled=False))
            if backend() == "gpu":
                try:
                    sides.append(TorchTrain(cfg, config, layout.steps, layout.rows, compiled=True))
                except Exception as e:  # torch.compile needs a C compiler and Triton: eager still compares
                    compile_error = f"{type(e).__name__}: {e}"[:500]
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
    ours = sides[0]
    result.update(reports["ours"], peak_rss_gb=peak_rss_gb(), loss=ours.loss)
    result.pop("name")
    if cfg.compare:
        theirs = [reports[s.name] for s in sides[1:]]
        best = min(theirs, key=lambda r: r["ms_per_iter"])
        result["torch"] = {**best, "loss": next(s.loss for s in sides if s.name == best["name"])}
        result["torch_variants"] = {r["name"]: r["ms_per_iter"] for r in theirs}
        if compile_error:
            result["torch_compile_error"] = compile_error
        result["ratio"] = best["ms_per_iter"] / result["ms_per_iter"]  # > 1: ours is faster
        add_memory(cfg, result, layout.devices)
    return result


def add_memory(cfg: BenchConfig, result: dict, devices: int) -> None:
    """Each side's peak memory: fresh processes on a CPU (RSS), the in-process device peaks on a GPU."""
    if backend() != "cpu":
        result["memory"] = "peak device allocation of each library, one process"
        return
    for side, into in (("ours", result), ("torch", result["torch"])):
        into.update(fresh_process_memory(cfg, side, devices))
    result["memory"] = "fresh process per side: peak RSS above its start while stepping / while setting up"


def bench_generate(cfg: BenchConfig) -> dict:
    """Tokens per second of `generate` (new tokens of all rows / wall time), after compilation; with
    --compare=torch, greedy against transformers' generate on the same weights."""
    if cfg.compare and cfg.temperature != 0:
        raise ConfigError("the decoding comparison is greedy: pass --temperature=0 (or a --shape)")
    if cfg.compare and cfg.prompt_tokens + cfg.new_tokens > cfg.block_size:
        raise ConfigError(f"--prompt_tokens + --new_tokens = {cfg.prompt_tokens + cfg.new_tokens} is beyond "
                          f"--block_size={cfg.block_size}: transformers' generate does not crop the context")
    if "torch" in (cfg.side, cfg.compare):
        torch_modules()
    jax.devices()
    start_rss = rss_gb()
    config = model_config(cfg, cfg.vocab_size)
    params = init_params(config, jax.random.PRNGKey(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (cfg.num_samples, cfg.prompt_tokens)).astype(np.int32)
    sides = []
    if cfg.side in ("both", "ours"):
        sides.append(OursDecode(cfg, config, params, prompt))
    if cfg.side == "torch" or (cfg.side == "both" and cfg.compare):
        sides.append(TorchDecode(cfg, config, params, prompt))
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
    result.update(reports["ours"], ms=reports["ours"]["ms_per_call"], peak_rss_gb=peak_rss_gb())
    result.pop("name")
    if cfg.compare:
        ours, theirs = sides
        result["torch"] = reports[theirs.name]
        result["ratio"] = result["tokens_per_sec"] / result["torch"]["tokens_per_sec"]  # > 1: ours is faster
        new_ours, new_theirs = ours.tokens[:, cfg.prompt_tokens:], theirs.tokens[:, cfg.prompt_tokens:]
        differ = np.nonzero((new_ours != new_theirs).any(axis=0))[0]
        result["same_tokens"] = differ.size == 0
        result["first_different_token"] = int(differ[0]) if differ.size else None
        add_memory(cfg, result, 1)
    return result


def bench(cfg: BenchConfig) -> dict:
    """One case, measured: the result as a dict (printed as one JSON line by the command)."""
    cfg = shaped(cfg)
    load_before = os.getloadavg()[0]
    result = {"train": bench_train, "generate": bench_generate}[cfg.bench](cfg)
    result["device"] = jax.devices()[0].device_kind
    result["malloc"] = allocator()
    # Other work on the machine slows both sides, torch's spinning OpenMP threads most: say how busy it was.
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result
