"""Checkpoints with orbax: `out_dir/checkpoints/{latest,best}/<iter>/` holding params, optimizer state,
the base RNG key and the run record (`RunRecord`: train config, model config, vocabulary, iteration, best
val loss). The record is defined, written and read here and nowhere else."""

import dataclasses
import math
import jax
import orbax.checkpoint as ocp
from etils import epath

from .config import UserError
from .model import GPTConfig
from .tracking import on_object_store

KINDS = ("latest", "best")
RECORD_VERSION = 1


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for, or one that would be overwritten."""


@dataclasses.dataclass
class RunRecord:
    """What a checkpoint says about its run, beside the arrays."""

    train: dict  # the TrainConfig's fields
    model: dict  # the GPTConfig's fields
    meta: dict | None  # the tokenizer (see tokenizers.py: characters, words, sentencepiece); None for GPT-2 BPE
    iter_num: int = 0
    best_val_loss: float = math.inf
    version: int = RECORD_VERSION

    @property
    def config(self) -> GPTConfig:
        return GPTConfig(**self.model)

    @classmethod
    def from_json(cls, data: dict, where) -> "RunRecord":
        version = data.get("version", 1)  # records written before the field existed are version 1
        names = {f.name for f in dataclasses.fields(cls)}
        model_names = {f.name for f in dataclasses.fields(GPTConfig)}
        unknown = sorted(set(data) - names) + sorted(set(data.get("model", {})) - model_names)
        if version > RECORD_VERSION or unknown:
            raise CheckpointError(f"{where} was written by a newer nanogpt-jax (record version {version}, "
                                  f"unknown fields {unknown}); upgrade nanogpt-jax to read it")
        return cls(**{k: v for k, v in data.items() if k != "version"}, version=version)


def refuse_existing_run(out_dir: str, what: str) -> None:
    """A new run, finetune or import never writes over the checkpoints of another."""
    root = epath.Path(out_dir) / "checkpoints"
    if root.is_dir() and any(p.name.isdigit() for p in root.glob("*/*")):
        raise CheckpointError(f"{out_dir} already holds a run's checkpoints: {what}")


def run_path(out_dir: str) -> epath.Path:
    """out_dir as orbax wants it: absolute on a disk; a bucket path (gs://bucket/run) as it is."""
    path = epath.Path(out_dir)
    return path if on_object_store(path) else path.absolute()


class Checkpointer:
    def __init__(self, out_dir: str, create: bool = True):
        root = run_path(out_dir) / "checkpoints"
        if not create and not root.is_dir():
            raise CheckpointError(f"no checkpoints in {out_dir}: train first, or check --out_dir")
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
        self.managers = {kind: ocp.CheckpointManager(root / kind, options=options) for kind in KINDS}

    def save(self, kind: str, iter_num: int, params, opt_state, rng, record: RunRecord) -> None:
        # One save at a time: `latest` and `best` of one step would share orbax's multi-process barrier names.
        for mngr in self.managers.values():
            mngr.wait_until_finished()
        # Params apart from the rest, so that sampling restores them alone.
        saved = self.managers[kind].save(iter_num, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            optimizer=ocp.args.StandardSave({"opt_state": opt_state, "rng": rng}),
            record=ocp.args.JsonSave(dataclasses.asdict(record))))
        if not saved:  # orbax skips a step at or below one already on disk
            raise CheckpointError(f"the {kind} checkpoint at iteration {iter_num} was not saved: "
                                  f"{self.managers[kind].directory} already holds a later one")

    def record(self, kind: str) -> RunRecord:
        data = self._restore(kind, record=ocp.args.JsonRestore())["record"]
        return RunRecord.from_json(data, self.managers[kind].directory)

    def restore(self, kind: str, **targets) -> dict:
        """Restore the named items (params=, optimizer={opt_state, rng}) onto the layouts of abstract trees."""
        return self._restore(kind, **{k: ocp.args.StandardRestore(v) for k, v in targets.items()})

    def _restore(self, kind, **args):
        if kind not in KINDS:
            raise CheckpointError(f"unknown checkpoint {kind!r}: use one of {KINDS}")
        mngr = self.managers[kind]
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"no {kind} checkpoint in {mngr.directory}: train first, or check --out_dir")
        return mngr.restore(step, args=ocp.args.Composite(**args))

    def close(self) -> None:
        for mngr in self.managers.values():
            mngr.wait_until_finished()
            mngr.close()


def abstract(tree, shardings):
    """Shape/dtype stand-ins for a restore target, each leaf placed with its sharding (a matching tree)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
