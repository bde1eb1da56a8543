"""load.py: the compute dtype chosen for this machine, the GPTConfig a TrainConfig describes, the runtime options
applied over a saved architecture, and load_run / load_checkpoint / load_model giving back what was saved."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal
from nanogpt_jax import load_checkpoint
from nanogpt_jax.checkpoint import Checkpointer, CheckpointError, RunRecord, checksum
from nanogpt_jax.config import ConfigError, LoadConfig, TrainConfig
from nanogpt_jax.load import load_model, load_run, model_config, resolve_dtype, with_runtime
from nanogpt_jax.model import GPTConfig, init_params
from nanogpt_jax.pretrained import from_pretrained

ON_CPU = jax.default_backend() == "cpu"
RUNTIME = {"dtype", "dropout", "attn_impl", "remat", "scan_layers"}  # the options that may change between runs of one model


def test_dtype_choice():
    """auto is float32 on a CPU and bfloat16 elsewhere; float16 is refused where XLA has no kernels for it."""
    assert resolve_dtype("auto") == ("float32" if ON_CPU else "bfloat16")
    assert resolve_dtype("bfloat16") == "bfloat16" and resolve_dtype("float32") == "float32"
    with pytest.raises(ConfigError, match="--dtype=float64: use float32, bfloat16, float16 or auto"):
        resolve_dtype("float64")
    if ON_CPU:
        with pytest.raises(ConfigError, match="float16 needs a GPU"):
            resolve_dtype("float16")
    else:
        assert resolve_dtype("float16") == "float16"


def test_model_config_copies_every_gptconfig_field_by_name():
    """Every GPTConfig field but vocab_size is a TrainConfig option of the same name, and model_config copies
    each one: set to values unlike GPTConfig's defaults, they all arrive."""
    gpt_fields = [f.name for f in dataclasses.fields(GPTConfig)]
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert [n for n in gpt_fields if n not in train_fields] == ["vocab_size"]
    shared = [n for n in gpt_fields if n in train_fields]
    cfg = TrainConfig(block_size=40, n_layer=3, n_head=3, n_embd=48, dropout=0.25, bias=False, model="bigram",
                      dtype="bfloat16", attn_impl="xla", remat=True, scan_layers=False)
    defaults = GPTConfig()
    assert all(getattr(cfg, n) != getattr(defaults, n) for n in shared)  # so a field left at its default shows
    config = model_config(cfg, vocab_size=77)
    assert {n: getattr(config, n) for n in shared} == {n: getattr(cfg, n) for n in shared}
    assert config.vocab_size == 77
    assert model_config(dataclasses.replace(cfg, dtype="auto"), 77).dtype == resolve_dtype("auto")


def test_with_runtime_keeps_the_architecture_and_replaces_only_the_runtime_options():
    """with_runtime changes exactly dtype, dropout, attn_impl, remat and scan_layers; every other field is the
    saved one. remat=True is "full" (as before the policies); scan_layers None is the platform's choice."""
    saved = GPTConfig(block_size=40, vocab_size=77, n_layer=3, n_head=3, n_embd=48, dropout=0.0, bias=False,
                      model="gpt", dtype="float32", attn_impl=None, remat=False, scan_layers=True)
    new = with_runtime(saved, dtype="bfloat16", dropout=0.3, attn_impl="xla", remat=True, scan_layers=False)
    changed = {f.name for f in dataclasses.fields(GPTConfig) if getattr(new, f.name) != getattr(saved, f.name)}
    assert changed == RUNTIME
    assert (new.dtype, new.dropout, new.attn_impl, new.remat, new.scan_layers) == ("bfloat16", 0.3, "xla", "full",
                                                                                   False)
    assert with_runtime(saved, dtype="auto", dropout=0.0, attn_impl=None, remat="none") == dataclasses.replace(
        saved, dtype=resolve_dtype("auto"), scan_layers=not ON_CPU)
    assert with_runtime(saved, dtype="auto", dropout=0.0, attn_impl=None, platform="tpu").scan_layers
    if ON_CPU:
        with pytest.raises(ConfigError, match="--attn_impl=cudnn needs an NVIDIA GPU"):
            with_runtime(saved, dtype="float32", dropout=0.0, attn_impl="cudnn", remat=False)


def test_load_run_and_load_checkpoint_give_back_what_was_saved(tmp_path):
    """Params, GPTConfig and record of the latest and the best checkpoint, each its own; a missing kind is a
    CheckpointError naming it."""
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, bias=False, dtype="float32")
    meta = {"vocab_size": 11, "itos": list("abcdefghijk")}
    saved = {}
    ckpt = Checkpointer(str(tmp_path))
    try:
        for kind, it, seed in (("best", 3, 1), ("latest", 5, 2)):
            params = init_params(config, jax.random.PRNGKey(seed))
            record = RunRecord(train=dataclasses.asdict(TrainConfig()), model=dataclasses.asdict(config), meta=meta,
                               iter_num=it, best_val_loss=1.5)
            ckpt.save(kind, it, params, {"count": jnp.zeros((), jnp.int32)}, jax.random.PRNGKey(0), record)
            saved[kind] = (params, record)
    finally:
        ckpt.close()
    for kind, (params, record) in saved.items():
        got_config, got_params, got_record = load_run(str(tmp_path), kind)
        # the record as given, with the checksum of what was saved added
        assert got_config == config and dataclasses.replace(got_record, checksums=None) == record
        assert got_record.checksums["params"] == checksum(params)
        assert_trees_equal(got_params, params)
        assert {x.dtype for x in jax.tree.leaves(got_params)} == {jnp.dtype(jnp.float32)}
        config2, params2 = load_checkpoint(str(tmp_path), kind)
        assert config2 == config
        assert_trees_equal(params2, params)
    assert not np.array_equal(saved["best"][0]["wte"]["embedding"], saved["latest"][0]["wte"]["embedding"])

    # load_model: the latest checkpoint, its vocabulary, dropout off and this machine's dtype
    got_config, got_params, got_meta, got_record = load_model(LoadConfig(out_dir=str(tmp_path), dtype="bfloat16"))
    assert got_config == dataclasses.replace(config, dtype="bfloat16", scan_layers=not ON_CPU) and got_meta == meta
    assert dataclasses.replace(got_record, checksums=None) == saved["latest"][1]
    assert_trees_equal(got_params, saved["latest"][0])

    only_latest = tmp_path / "only_latest"
    ckpt = Checkpointer(str(only_latest))
    try:
        ckpt.save("latest", 1, saved["latest"][0], {"count": jnp.zeros((), jnp.int32)}, jax.random.PRNGKey(0),
                  saved["latest"][1])
    finally:
        ckpt.close()
    with pytest.raises(CheckpointError, match="no best checkpoint in"):
        load_run(str(only_latest), "best")


@pytest.mark.slow
def test_load_model_of_a_huggingface_folder(hf_small):
    """An HF folder loads as from_pretrained reads it, with this command's dtype, no record and GPT-2 BPE."""
    _, folder = hf_small
    config, params, meta, record = load_model(LoadConfig(init_from=str(folder), dtype="bfloat16"))
    ref_config, ref_params = from_pretrained(folder)
    assert config == dataclasses.replace(ref_config, dtype="bfloat16", scan_layers=not ON_CPU) and config.dropout == 0.0
    assert meta is None and record is None
    assert_trees_equal(params, ref_params)
