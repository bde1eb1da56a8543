"""`nanogpt-jax convert`: a HuggingFace GPT-2 (hub id or folder) <-> a checkpoint of this project.

HF -> checkpoint writes out_dir/checkpoints/latest at iteration 0 with a fresh AdamW state, so that
`train --init_from=resume --out_dir=...` finetunes it and `sample --out_dir=...` samples it.
Checkpoint -> HF writes config.json + model.safetensors (save_pretrained; a bias=False model gets zero
biases, which HF GPT-2 always has) and, for a character-level model, its vocabulary as meta.json (the
dataset's format), which loading such a folder here (sample, eval, convert) reads back.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from .checkpoint import Checkpointer, RunRecord, refuse_existing_run
from .config import ConfigError, ConvertConfig, TrainConfig, UserError
from .load import abstract_params, folder_meta, load_run
from .optim import OptimConfig, make_optimizer
from .pretrained import PretrainedError, from_pretrained, refuse_existing_model, save_pretrained

META_FILE = "meta.json"


class ConvertError(UserError):
    """A model that cannot be converted, or a destination that would be overwritten."""


def import_hf(source: str, out_dir: str) -> str:
    """HF GPT-2 (hub id, folder or .safetensors) -> out_dir/checkpoints/latest; returns a summary line."""
    refuse_existing_run(out_dir, "convert into a new --out_dir")
    config, params = from_pretrained(source)
    # The run record a finetune of this model would write: the architecture, GPT-2's biases, no dropout.
    cfg = TrainConfig(out_dir=out_dir, init_from=str(source), n_layer=config.n_layer, n_head=config.n_head,
                      n_embd=config.n_embd, block_size=config.block_size, bias=True, dropout=0.0)
    record = RunRecord(train=dataclasses.asdict(cfg), model=dataclasses.asdict(config), meta=folder_meta(source))
    ckpt = Checkpointer(out_dir)
    try:
        ckpt.save("latest", 0, params, make_optimizer(OptimConfig.of(cfg)).init(params), jax.random.PRNGKey(cfg.seed), record)
    finally:
        ckpt.close()
    return f"wrote {Path(out_dir) / 'checkpoints' / 'latest'} from {source} ({_describe(config)})"


def export_hf(out_dir: str, hf_dir: str, kind: str = "latest") -> str:
    """out_dir's latest (or best) checkpoint -> an HF folder GPT2LMHeadModel.from_pretrained loads."""
    if Path(hf_dir).exists() and not Path(hf_dir).is_dir():
        raise ConvertError(f"--hf_dir={hf_dir} is a file; give a folder to write config.json and model.safetensors in")
    refuse_existing_model(hf_dir, "export into a new --hf_dir, or delete its files first")
    config, params, record = load_run(out_dir, kind)
    if config.model == "gpt" and not config.bias:
        config, params = with_zero_biases(config, params)
    try:
        save_pretrained(config, params, hf_dir)
    except PretrainedError as e:
        raise ConvertError(f"cannot export {out_dir}: {e}") from None
    meta_path = Path(hf_dir) / META_FILE
    if record.meta is not None:
        meta_path.write_text(json.dumps(record.meta), encoding="utf-8")
    else:
        meta_path.unlink(missing_ok=True)  # a stale vocabulary from an earlier export would mislead loading
    return f"wrote {hf_dir} from {out_dir} {kind} checkpoint at iteration {record.iter_num} ({_describe(config)})"


def with_zero_biases(config, params):
    """A bias=False GPT as the bias=True GPT that computes the same function: every bias zero."""
    config = dataclasses.replace(config, bias=True)
    shapes = abstract_params(config)

    def take(path, leaf):
        node = params
        for k in path:
            if k.key not in node:
                return jnp.zeros(leaf.shape, leaf.dtype)
            node = node[k.key]
        return node

    return config, jax.tree_util.tree_map_with_path(take, shapes)


def convert(cfg: ConvertConfig) -> str:
    """Direction from init_from: 'resume' exports out_dir to hf_dir, anything else imports it into out_dir."""
    if cfg.init_from == "resume":
        if cfg.hf_dir is None:
            raise ConfigError("convert --init_from=resume (the default) exports out_dir's checkpoint: "
                              "give --hf_dir=FOLDER to write, or --init_from=gpt2|HF_FOLDER to import")
        return export_hf(cfg.out_dir, cfg.hf_dir, cfg.checkpoint)
    if cfg.hf_dir is not None:
        raise ConfigError(f"--hf_dir is for exporting a checkpoint (--init_from=resume); importing "
                          f"{cfg.init_from} writes a checkpoint to --out_dir")
    return import_hf(cfg.init_from, cfg.out_dir)


def _describe(config) -> str:
    return (f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
            f"block_size={config.block_size}, vocab_size={config.vocab_size}")
