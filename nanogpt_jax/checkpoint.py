"""Checkpoints with orbax: `out_dir/checkpoints/{latest,best}/<iter>/` holding params, optimizer state,
the base RNG key and a JSON record of the run (train config, model config, iteration, best val loss)."""

from pathlib import Path

import dataclasses

import jax
import orbax.checkpoint as ocp

from .config import UserError
from .model import GPTConfig

KINDS = ("latest", "best")


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for."""


class Checkpointer:
    def __init__(self, out_dir: str, create: bool = True):
        root = Path(out_dir).absolute() / "checkpoints"
        if not create and not root.is_dir():
            raise CheckpointError(f"no checkpoints in {out_dir}: train first, or check --out_dir")
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
        self.managers = {kind: ocp.CheckpointManager(root / kind, options=options) for kind in KINDS}

    def save(self, kind: str, iter_num: int, params, opt_state, rng, record: dict) -> None:
        # Params apart from the rest, so that sampling restores them alone.
        saved = self.managers[kind].save(iter_num, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            optimizer=ocp.args.StandardSave({"opt_state": opt_state, "rng": rng}),
            record=ocp.args.JsonSave(record)))
        if not saved:  # orbax skips a step at or below one already on disk
            raise CheckpointError(f"the {kind} checkpoint at iteration {iter_num} was not saved: "
                                  f"{self.managers[kind].directory} already holds a later one")

    def has_checkpoints(self) -> bool:
        return any(mngr.latest_step() is not None for mngr in self.managers.values())

    def record(self, kind: str) -> dict:
        return self._restore(kind, record=ocp.args.JsonRestore())["record"]

    def restore(self, kind: str, **targets) -> dict:
        """Restore the named items (params=, optimizer={opt_state, rng}) onto the layouts of abstract trees."""
        return self._restore(kind, **{k: ocp.args.StandardRestore(v) for k, v in targets.items()})

    def _restore(self, kind, **args):
        mngr = self.managers[kind]
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"no {kind} checkpoint in {mngr.directory}: train first, or check --out_dir")
        return mngr.restore(step, args=ocp.args.Composite(**args))

    def close(self) -> None:
        for mngr in self.managers.values():
            mngr.wait_until_finished()
            mngr.close()


def abstract(tree, sharding=None):
    """Shape/dtype stand-ins for a restore target, optionally placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def load_checkpoint(out_dir: str, kind: str = "latest"):
    """(GPTConfig, params) of a training run's latest (or best) checkpoint."""
    config, params, _ = load_run(out_dir, kind)
    return config, params


def load_run(out_dir: str, kind: str = "latest"):
    """(GPTConfig, params, record): the record holds the run's train config, vocabulary and iteration."""
    from .model import init_params

    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint {kind!r}: use one of {KINDS}")
    ckpt = Checkpointer(out_dir, create=False)
    try:
        record = ckpt.record(kind)
        config = GPTConfig(**record["model"])
        shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
        params = ckpt.restore(kind, params=abstract(shapes, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
    finally:
        ckpt.close()
    return config, params["params"], record


def load_model(init_from: str, out_dir: str = "out", checkpoint: str = "latest", dtype: str = "auto"):
    """(GPTConfig, params, meta, record) of a checkpoint (init_from='resume') or a GPT-2 name / HF folder.

    meta is the character vocabulary (None: GPT-2 BPE); record is the checkpoint's record (None for HF)."""
    from .train import resolve_dtype

    dtype = resolve_dtype(dtype)
    if init_from == "resume":
        config, params, record = load_run(out_dir, checkpoint)
        meta = record["meta"]
    else:
        from .convert import folder_meta
        from .pretrained import from_pretrained

        config, params = from_pretrained(init_from)
        meta, record = folder_meta(init_from), None
    # cuDNN attention only where there is cuDNN: a model trained with it on a GPU samples anywhere
    attn_impl = config.attn_impl if jax.default_backend() == "gpu" else None
    config = dataclasses.replace(config, dtype=dtype, dropout=0.0, remat=False, attn_impl=attn_impl)
    return config, params, meta, record
