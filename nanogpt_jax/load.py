"""A model from any source, ready to run: a run's checkpoint or released GPT-2 weights, with the options
that belong to this machine and this command (compute dtype, dropout, attention kernel, remat) applied.
`sample`, `eval`, `convert` and `train` all get their GPTConfig and params from here."""

import dataclasses
from pathlib import Path

import jax

from . import data, parallel
from .checkpoint import Checkpointer, RunRecord, abstract
from .config import ConfigError, LoadConfig, TrainConfig
from .model import DTYPES, GPTConfig, crop_block_size, init_params
from .pretrained import from_pretrained


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
    """'auto' -> float32 on a CPU, bfloat16 elsewhere; float16 only where it has kernels. `platform`: the
    devices the program is for (default: this process's backend)."""
    platform = platform or jax.default_backend()
    if dtype == "auto":
        return "float32" if platform == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype}: use float32, bfloat16, float16 or auto")
    if dtype == "float16" and platform == "cpu":  # XLA:CPU has no float16 attention kernels
        raise ConfigError("--dtype=float16 needs a GPU; on a CPU use float32 or bfloat16")
    return dtype


def check_attn_impl(attn_impl: str | None, platform: str | None = None) -> None:
    platform = platform or jax.default_backend()
    if attn_impl == "cudnn" and platform != "gpu":
        raise ConfigError(f"--attn_impl=cudnn needs an NVIDIA GPU (this is {platform}); leave it unset or use xla")


def resolve_scan(scan_layers: bool | None, platform: str | None = None) -> bool:
    """None -> the layers unrolled on a CPU (the CPU recipe's step: 41 ms unrolled, 75 ms scanned, on an AMD
    EPYC Zen 4), scanned on accelerators (one layer body to compile, one layer's weights gathered at a time)."""
    return (platform or jax.default_backend()) != "cpu" if scan_layers is None else scan_layers


def with_runtime(config: GPTConfig, *, dtype: str, dropout: float, attn_impl: str | None, remat: str = "none",
                 scan_layers: bool | None = None, platform: str | None = None) -> GPTConfig:
    """The architecture as saved, the options of this run: they may change between runs of one model."""
    check_attn_impl(attn_impl, platform)
    return dataclasses.replace(config, dtype=resolve_dtype(dtype, platform), dropout=dropout, attn_impl=attn_impl,
                               remat=remat, scan_layers=resolve_scan(scan_layers, platform))


def runtime(cfg: TrainConfig, platform: str | None = None) -> dict:
    """with_runtime's options as a training config gives them."""
    return dict(dtype=cfg.dtype, dropout=cfg.dropout, attn_impl=cfg.attn_impl, remat=cfg.remat,
                scan_layers=cfg.scan_layers, platform=platform)


def model_config(cfg: TrainConfig, vocab_size: int, platform: str | None = None) -> GPTConfig:
    """The GPTConfig a training config describes: every GPTConfig field taken from cfg by name."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig) if hasattr(cfg, f.name)}
    return with_runtime(GPTConfig(**{**fields, "vocab_size": vocab_size}), **runtime(cfg, platform))


def crop(config: GPTConfig, params, block_size: int):
    """model.crop_block_size, its error worded as the --block_size option."""
    try:
        return crop_block_size(config, params, block_size)
    except ValueError as e:
        raise ConfigError(f"--block_size={block_size}: {e}") from None


def folder_meta(name_or_path) -> dict | None:
    """The tokenizer an exported HF folder carries (meta.json: characters, words, sentencepiece); None means
    GPT-2 BPE."""
    path = Path(str(name_or_path)).expanduser()
    return data.load_meta(path) if path.is_dir() else None


def abstract_params(config: GPTConfig):
    """The params tree's shapes and dtypes, nothing allocated."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def load_run(out_dir: str, kind: str = "latest") -> tuple[GPTConfig, dict, RunRecord]:
    """(GPTConfig, params on one device, record) of a training run's latest (or best) checkpoint."""
    ckpt = Checkpointer(out_dir, create=False)
    try:
        record = ckpt.record(kind)
        shapes = abstract_params(record.config)
        one_device = parallel.state_shardings(parallel.single_device_mesh(), shapes)
        params = ckpt.restore(kind, params=abstract(shapes, one_device))
    finally:
        ckpt.close()
    return record.config, params["params"], record


def load_checkpoint(out_dir: str, kind: str = "latest") -> tuple[GPTConfig, dict]:
    """(GPTConfig, params) of a training run's latest (or best) checkpoint."""
    config, params, _ = load_run(out_dir, kind)
    return config, params


def load_model(cfg: LoadConfig) -> tuple[GPTConfig, dict, dict | None, RunRecord | None]:
    """(GPTConfig, params, meta, record) for inference: a checkpoint (init_from='resume') or a GPT-2 name /
    HF folder. meta is the character vocabulary (None: GPT-2 BPE); record is None for HF weights."""
    if cfg.init_from == "resume":
        config, params, record = load_run(cfg.out_dir, cfg.checkpoint)
        meta = record.meta
    else:
        config, params = from_pretrained(cfg.init_from)
        meta, record = folder_meta(cfg.init_from), None
    # cuDNN attention only where there is cuDNN: a model trained with it on a GPU samples anywhere
    attn_impl = config.attn_impl if jax.default_backend() == "gpu" else None
    config = with_runtime(config, dtype=cfg.dtype, dropout=0.0, attn_impl=attn_impl)
    return config, params, meta, record
