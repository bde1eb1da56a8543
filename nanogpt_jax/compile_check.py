"""`nanogpt-jax compile`: the program `train` (or `generate`) would run, compiled ahead of time with abstract
arrays for this machine's devices or for a TPU topology's (libtpu's own compiler runs on a CPU-only machine),
and what XLA says each device would hold and do. Nothing is downloaded, loaded or allocated."""

import dataclasses
import importlib.util
import time
from pathlib import Path

import jax
from jax.experimental import topologies

from . import data, parallel
from .checkpoint import Checkpointer
from .config import CompileConfig, ConfigError
from .generate import lower_programs
from .load import abstract_params, model_config, runtime, with_runtime
from .memory import gib, per_device_bytes
from .model import GPTConfig
from .pretrained import pretrained_config
from .program import Compiled, CompiledTooBigError, Program, compiled_figures


# HBM per JAX device (Google Cloud's TPU system architecture pages): v2 and v3 show each chip as two devices
# (TensorCores) with half its memory each; v4, v5p (megacore) and v5e, v6e (one core) show one per chip.
HBM_GIB = {"TPU v2": 8, "TPU v3": 16, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95,
           "TPU v6 lite": 32, "TPU v6e": 32}


def topology_devices(name: str):
    """The devices of a TPU topology libtpu knows (v5e:2x4, v4:2x2x2, ...), on any machine with libtpu."""
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology={name} needs libtpu: pip install 'nanogpt-jax[tpu]'")

    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except Exception as e:  # noqa: BLE001 - libtpu says an unknown name with a RuntimeError or XlaRuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--topology={name}: libtpu does not know it ({first[:160]}); use a name such as "
                          "v5e:2x4, v4:2x2x1, v4:2x2x2, v3:2x2, v2:2x2 or v6e:2x4") from None


def device_memory(device) -> int | None:
    """Bytes one device has: what it reports, else the HBM table by its kind, else (a CPU) its host share."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - a topology's devices report nothing (or raise)
        limit = None
    if limit:
        return limit
    if device.device_kind in HBM_GIB:
        return HBM_GIB[device.device_kind] * 2**30
    return per_device_bytes() if device.platform == "cpu" else None


def model_for(cfg: CompileConfig, platform: str) -> GPTConfig:
    """The GPTConfig `train` would build for cfg, from sizes alone: a checkpoint's record, a GPT-2's known
    sizes or an HF folder's config.json, or the options (the dataset's vocabulary when it is prepared)."""
    options = runtime(cfg, platform)
    if cfg.init_from == "resume":
        ckpt = Checkpointer(cfg.out_dir, create=False)
        try:
            return with_runtime(ckpt.record(cfg.checkpoint).config, **options)
        finally:
            ckpt.close()
    if cfg.init_from != "scratch":
        config = with_runtime(pretrained_config(cfg.init_from), **options)
        if cfg.block_size > config.block_size:
            raise ConfigError(f"--block_size={cfg.block_size}: {cfg.init_from} has only {config.block_size} "
                              "positions; it can be cropped, not grown")
        return dataclasses.replace(config, block_size=cfg.block_size)
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    meta = data.load_meta(dataset_dir) if dataset_dir.is_dir() else None
    return model_config(cfg, meta["vocab_size"] if meta else 50304, platform)


def compile_generate(cfg: CompileConfig, config: GPTConfig, devices) -> Compiled:
    """`generate` for num_samples x prompt_tokens -> + max_new_tokens, as `sample --fsdp` places it: the params
    split over --fsdp of the devices (replicated over the others), everything else replicated."""
    if len(devices) % cfg.fsdp:
        raise ConfigError(f"--fsdp={cfg.fsdp} must divide the {len(devices)} device(s)")
    mesh = parallel.make_mesh(list(devices), cfg.fsdp)
    rep = parallel.replicated(mesh)
    shapes = abstract_params(config)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                          parallel.state_shardings(mesh, shapes))
    t0 = time.perf_counter()
    prefill, decode = lower_programs(config, params, cfg.num_samples, cfg.prompt_tokens, cfg.max_new_tokens,
                                   sharding=rep, temperature=0.8, top_k=200)
    a, b = (compiled_figures(lambda: lowered)[1] for lowered in (prefill, decode))
    # the two run one after the other: the larger peak is the program's; the work and the compiling add up
    return Compiled(max(a.argument_bytes, b.argument_bytes), max(a.temp_bytes, b.temp_bytes),
                    max(a.peak_bytes, b.peak_bytes), None if a.flops is None else a.flops + (b.flops or 0),
                    time.perf_counter() - t0)


def compile_check(cfg: CompileConfig, log=print) -> dict:
    """Compile and report (a line per figure through `log`); the result's "fits" says whether each device holds
    the program, and "error" what to change when it does not."""
    devices = topology_devices(cfg.topology) if cfg.topology else jax.devices()
    platform = devices[0].platform
    config = model_for(cfg, platform)
    try:
        if cfg.what == "generate":
            where = f"generate on {len(devices)} device(s)"
            figures = compile_generate(cfg, config, devices)
        else:
            where = "the train step"
            program = Program(cfg, config, devices)
            log(f"layout: {program.layout.describe()}")
            devices = list(program.mesh.devices.flat)
            figures = program.compile_step()[1]
    except CompiledTooBigError as e:  # its temporaries alone: the peak is at least that
        log(f"{where}: {e}")
        figures = Compiled(0, e.temp_bytes, e.temp_bytes, None, e.seconds)
    kind, have = devices[0].device_kind, device_memory(devices[0])
    fits = have is None or figures.peak_bytes <= have
    result = {"topology": cfg.topology or f"this machine ({platform})", "device_kind": kind, "devices": len(devices),
              "processes": len({d.process_index for d in devices}), "what": cfg.what,
              "model": dataclasses.asdict(config), "argument_gib": figures.argument_bytes / 2**30,
              "temp_gib": figures.temp_bytes / 2**30, "peak_gib_per_device": figures.peak_bytes / 2**30,
              "hbm_gib_per_device": None if have is None else have / 2**30, "fits": fits,
              "compile_s": figures.seconds, "flops_per_device": figures.flops}
    log(f"{where}, per device ({kind}): arguments {gib(figures.argument_bytes, 2)}, temporaries "
        f"{gib(figures.temp_bytes, 2)}, peak {gib(figures.peak_bytes, 2)} of {'?' if have is None else gib(have, 2)}: "
        f"{'fits' if fits else 'does NOT fit'}")
    flops = "n/a" if figures.flops is None else f"{figures.flops / 1e12:,.2f} TFLOP per device"
    log(f"compiled in {figures.seconds:.1f} s; XLA's count: {flops}")
    if not fits:
        result["error"] = (f"{where} needs {gib(figures.peak_bytes, 2)} per device, {gib(figures.peak_bytes - have, 2)} "
                           f"more than a {kind}'s {gib(have, 2)}: shard with --fsdp, recompute with --remat=full, "
                           "or lower --micro_batch_size or --block_size")
    return result
