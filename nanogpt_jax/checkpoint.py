"""Checkpoints with orbax: `out_dir/checkpoints/{latest,best}/<iter>/` holding params, optimizer state,
the base RNG key and the run record (`RunRecord`: train config, model config, vocabulary, iteration, best
val loss, checksums of the arrays). The record is defined, written and read here and nowhere else.

orbax writes each checkpoint into a temporary folder and renames it when complete, so a kill leaves the
previous checkpoint whole; what it cannot see is a file damaged after the fact. Each save records a checksum
of its arrays, and each restore recomputes it: a truncated, garbled or incomplete checkpoint is one error
naming its folder, never an orbax traceback or silently wrong weights."""

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import re
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from .config import UserError
from .model import GPTConfig, stack_layers, unstack_layers
from .tracking import on_object_store

KINDS = ("latest", "best")
ITEMS = ("params", "optimizer", "record")
# 2: best_iter and checksums. A version-1 record reads with both None (nothing to verify or repair).
# 3: the blocks stacked under h (a leading layer axis); versions 1 and 2 hold h_0 .. h_{L-1}, stacked on restore.
# 4: a float16 run's optimizer state is step.ScaledState (its own and the loss scale); earlier float16 runs had none.
RECORD_VERSION = 4


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for, or one that would be overwritten."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint that cannot be read back as it was saved: truncated, garbled, or files missing."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, no permission, ...); the previous one is kept."""


@dataclasses.dataclass
class RunRecord:
    """What a checkpoint says about its run, beside the arrays."""

    train: dict  # the TrainConfig's fields
    model: dict  # the GPTConfig's fields
    meta: dict | None  # the tokenizer (see tokenizers.py: characters, words, sentencepiece); None for GPT-2 BPE
    iter_num: int = 0
    best_val_loss: float = math.inf
    best_iter: int | None = None  # the iteration the `best` checkpoint holds; None before the first one
    checksums: dict | None = None  # item name -> `checksum` of the arrays saved (Checkpointer.save fills it)
    version: int = RECORD_VERSION

    @property
    def config(self) -> GPTConfig:
        return GPTConfig(**self.model)

    @classmethod
    def from_json(cls, data, where) -> "RunRecord":
        if not isinstance(data, dict) or not {"train", "model", "meta"} <= set(data):
            raise DamagedCheckpointError(f"{where}: its record is not a run record (damaged or written by "
                                         "something else)")
        version = data.get("version", 1)  # records written before the field existed are version 1
        names = {f.name for f in dataclasses.fields(cls)}
        model_names = {f.name for f in dataclasses.fields(GPTConfig)}
        unknown = sorted(set(data) - names) + sorted(set(data.get("model", {})) - model_names)
        if version > RECORD_VERSION or unknown:
            raise CheckpointError(f"{where} was written by a newer nanogpt-jax (record version {version}, "
                                  f"unknown fields {unknown}); upgrade nanogpt-jax to read it")
        return cls(**{k: v for k, v in data.items() if k != "version"}, version=version)


# ------------------------------------------------------------------------------------------------ checksums


def _mix(x) -> jax.Array:
    """uint32 sum (mod 2**32, so order-free and exact under any sharding) of a bijective mix of each element's
    bits and its position: a changed element always changes the sum, several cancel with odds 2**-32."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize >= 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a trailing axis of 2
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
    index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    v = bits * jnp.uint32(0x9E3779B1) + index
    v = (v ^ (v >> 15)) * jnp.uint32(0x85EBCA77)
    return jnp.sum(v ^ (v >> 13), dtype=jnp.uint32)


_leaf_sums = jax.jit(lambda leaves: [_mix(x) for x in leaves])


def _leaf_name(path) -> str:
    """A leaf's path as orbax names it (opt_state.1.0.mu.wte.embedding), whatever the containers: a tree
    restored from metadata has dicts and lists where the saved one had optax's named tuples."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def checksum(tree) -> str:
    """A 64-bit hex digest of every array in `tree` (names, shapes, dtypes, bits), computed on the devices
    where the arrays live (sharded arrays included; every process gets the same digest)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_leaf_sums([x for _, x in flat]))
    h = hashlib.sha256()
    for name, x, s in sorted((_leaf_name(p), x, int(s)) for (p, x), s in zip(flat, sums)):
        h.update(f"{name} {tuple(x.shape)} {np.dtype(x.dtype).name} {s}\n".encode())
    return h.hexdigest()[:16]


def _why(e: BaseException) -> str:
    """An orbax / tensorstore / OS error as a short phrase: the OS's words where there is an errno."""
    text = str(e)
    code = getattr(e, "errno", None) or next(iter(re.findall(r"os_error_code='?(\d+)", text)), None)
    if code:
        return os.strerror(int(code))
    cause = e.__cause__ or e.__context__
    if "see full tensorstore details" in text.lower() and cause is not None:
        return _why(cause)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200] + ("..." if len(first) > 200 else "")


class _OrbaxFailureNoise(logging.Filter):
    """orbax logs a failed save or restore with tracebacks from its threads; the reads a failed restore leaves
    behind end as unraisable exceptions: 'Event loop is closed' from tensorstore's callbacks, and the errors of
    orbax's own read coroutines, which nobody awaits any more. Those of its read tasks that finished before the
    process exits are logged by asyncio ('Task exception was never retrieved'), and so are tensorstore's read
    futures ('Future exception was never retrieved': an error set from tensorstore's threads, with no orbax frame
    to tell it by, only its form: an absl status with no Python traceback). The Checkpointer reports such a
    failure itself, once, as one line: the command line drops these (quiet_orbax_failures)."""

    def filter(self, record):
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (ORBAX_DIR in record.pathname or _raised_in_orbax(exc) or _set_by_tensorstore(exc))

    def unraisable(self, previous):
        def hook(unraisable):
            closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                           and str(unraisable.exc_value) == "Event loop is closed")
            code = getattr(unraisable.object, "cr_code", None)  # an abandoned coroutine's code
            if not (closed_loop or (code is not None and code.co_filename.startswith(ORBAX_DIR))):
                previous(unraisable)

        hook.orbax_noise = True
        return hook


ORBAX_DIR = str(Path(ocp.__file__).resolve().parent)


def _raised_in_orbax(exc: BaseException | None) -> bool:
    return exc is not None and any(frame.f_code.co_filename.startswith(ORBAX_DIR)
                                   for frame, _ in traceback.walk_tb(exc.__traceback__))


# absl's status codes: tensorstore's errors read 'OUT_OF_RANGE: Error reading "wte.embedding/0.0" in OCDBT ...'
_ABSL_STATUS = re.compile(r"(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
                          r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
                          r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): ")


def _set_by_tensorstore(exc: BaseException | None) -> bool:
    """An error tensorstore's C++ threads set on a future: an absl status, never raised in Python."""
    return exc is not None and exc.__traceback__ is None and bool(_ABSL_STATUS.match(str(exc)))


def quiet_orbax_failures() -> None:
    """Install _OrbaxFailureNoise's filters once per process. For a program that owns its process (the
    command line calls it): the abandoned reads of a failed restore end as late as the interpreter's exit, so
    the filters stay. A library caller keeps orbax's own logs unless it calls this."""
    if getattr(sys.unraisablehook, "orbax_noise", False):
        return
    noise = _OrbaxFailureNoise()
    for logger in ("absl", "asyncio"):
        logging.getLogger(logger).addFilter(noise)
    sys.unraisablehook = noise.unraisable(sys.unraisablehook)


# ----------------------------------------------------------------------------------------------- the folders


def refuse_existing_run(out_dir: str, what: str) -> None:
    """A new run, finetune or import never writes over the checkpoints of another."""
    root = epath.Path(out_dir) / "checkpoints"
    if root.is_dir() and any(p.name.isdigit() for p in root.glob("*/*")):
        raise CheckpointError(f"{out_dir} already holds a run's checkpoints: {what}")


def last_saved(out_dir: str) -> int | None:
    """The newest iteration out_dir's `latest` holds or is being saved (a save in flight is finished before
    the run exits), from the folder names alone; None when there is none."""
    root = epath.Path(out_dir) / "checkpoints" / "latest"
    names = [p.name.split(".")[0] for p in root.glob("*")] if root.is_dir() else []
    return max((int(n) for n in names if n.isdigit()), default=None)


def run_path(out_dir: str) -> epath.Path:
    """out_dir as orbax wants it: absolute on a disk; a bucket path (gs://bucket/run) as it is."""
    path = epath.Path(out_dir)
    return path if on_object_store(path) else path.absolute()


class Checkpointer:
    def __init__(self, out_dir: str, create: bool = True):
        root = run_path(out_dir) / "checkpoints"
        if not create and not root.is_dir():
            raise CheckpointError(f"no checkpoints in {out_dir}: train first, or check --out_dir")
        # create: a writer (its run lock held) also clears the temporary folders of saves a kill cut short
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create, cleanup_tmp_directories=create)
        handlers = {"params": ocp.StandardCheckpointHandler(), "optimizer": ocp.StandardCheckpointHandler(),
                    "record": ocp.JsonCheckpointHandler()}
        try:
            self.managers = {kind: ocp.CheckpointManager(root / kind, options=options, item_handlers=handlers)
                             for kind in KINDS}
        except OSError as e:
            raise CheckpointSaveError(f"cannot write checkpoints to {root}: {_why(e)}") from e
        self._pending = {}  # kind -> iteration of a save still being written

    def save(self, kind: str, iter_num: int, params, opt_state, rng, record: RunRecord) -> None:
        # One save at a time: `latest` and `best` of one step would share orbax's multi-process barrier names.
        self.wait()
        optimizer = {"opt_state": opt_state, "rng": rng}
        record = dataclasses.replace(record, checksums={"params": checksum(params), "optimizer": checksum(optimizer)})
        mngr = self.managers[kind]
        try:
            # Params apart from the rest, so that sampling restores them alone.
            saved = mngr.save(iter_num, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), optimizer=ocp.args.StandardSave(optimizer),
                record=ocp.args.JsonSave(dataclasses.asdict(record))))
        except Exception as e:  # noqa: BLE001 - orbax, tensorstore and the OS each raise their own types
            self._failed(kind, iter_num, e)
        if not saved:  # orbax skips a step at or below one already on disk
            raise CheckpointError(f"the {kind} checkpoint at iteration {iter_num} was not saved: "
                                  f"{mngr.directory} already holds a later one")
        self._pending[kind] = iter_num

    def wait(self) -> None:
        """Until the saves in flight are on disk; a failed one is a CheckpointSaveError."""
        for kind, mngr in self.managers.items():
            try:
                mngr.wait_until_finished()
            except Exception as e:  # noqa: BLE001
                self._failed(kind, self._pending.get(kind), e)
            self._pending.pop(kind, None)

    def _failed(self, kind, iter_num, e):
        """A save that failed: its temporary folders removed, the previous checkpoint named as kept."""
        self._pending.pop(kind, None)
        directory = self.managers[kind].directory
        for tmp in directory.parent.glob("*/*.orbax-checkpoint-tmp*"):
            with contextlib.suppress(OSError):
                tmp.rmtree(missing_ok=True)
        kept = [int(p.name) for p in (directory.parent / "latest").glob("*") if p.name.isdigit()]
        previous = (f"the latest checkpoint (iteration {max(kept)}) is kept: free space (or fix the folder) and "
                    "continue with --init_from=resume") if kept else "no checkpoint was saved before it"
        raise CheckpointSaveError(f"could not write the {kind} checkpoint at iteration {iter_num} to {directory} "
                                  f"({_why(e)}); {previous}") from e

    def set_aside(self, kind: str, after: int) -> list[epath.Path]:
        """Move `kind`'s checkpoints later than iteration `after` to checkpoints/set_aside/ (kept, out of orbax's
        sight), so that a run resumed from an earlier one can save there again; returns where they went."""
        self.wait()
        directory = self.managers[kind].directory
        moved = []
        for step in sorted(s for s in self.managers[kind].all_steps() if s > after):
            target = directory.parent / "set_aside" / f"{kind}_{step}"
            target.parent.mkdir(exist_ok=True)
            (directory / str(step)).rename(target)
            moved.append(target)
        self.managers[kind].reload()
        return moved

    def latest_step(self, kind: str) -> int | None:
        return self.managers[kind].latest_step()

    def record(self, kind: str) -> RunRecord:
        step, data = self._read(kind, record=ocp.args.JsonRestore())
        return RunRecord.from_json(data["record"], self._folder(kind, step))

    def restore(self, kind: str, **targets) -> dict:
        """Restore the named items (params=, optimizer={opt_state, rng}) onto the layouts of abstract trees,
        each checked against the checksum saved with it. A checkpoint of layers saved one by one (record
        version < 3) is read layer by layer and stacked onto the targets' layouts."""
        per_layer = self.record(kind).version < 3 and any(
            getattr(k, "key", None) == "h" for path, _ in jax.tree_util.tree_flatten_with_path(targets)[0] for k in path)
        if per_layer:
            stacked, targets = targets, {k: unstack_layers(v, _abstract_layer) for k, v in targets.items()}
        args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
        step, restored = self._read(kind, record=ocp.args.JsonRestore(), **args)
        record = RunRecord.from_json(restored.pop("record"), self._folder(kind, step))
        for item, tree in restored.items():
            if record.checksums and checksum(tree) != record.checksums[item]:
                self._damaged(kind, step, f"its {item} differ from what was saved (checksum mismatch: a file "
                                          "was changed or damaged after the save)")
        if per_layer:
            restored = {k: jax.jit(stack_layers, out_shardings=jax.tree.map(lambda t: t.sharding, stacked[k]))(v)
                        for k, v in restored.items()}
        return restored

    def intact(self, kind: str) -> int | None:
        """The iteration `kind` holds if it reads back whole and matches its checksums, else None. Restores
        everything onto one local device (an error path: nothing else is running)."""
        try:
            step = self.latest_step(kind)
            if step is None:
                return None
            metadata = self.managers[kind].item_metadata(step)
            one = SingleDeviceSharding(jax.local_devices()[0])
            targets = {item: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                          metadata[item].tree if hasattr(metadata[item], "tree") else metadata[item])
                       for item in ("params", "optimizer")}
            self.restore(kind, **targets)
            return step
        except Exception:  # noqa: BLE001 - any failure (a CheckpointError included) means: not intact
            return None

    def _folder(self, kind: str, step) -> epath.Path:
        return self.managers[kind].directory / str(step)

    def _read(self, kind, **args):
        if kind not in KINDS:
            raise CheckpointError(f"unknown checkpoint {kind!r}: use one of {KINDS}")
        mngr = self.managers[kind]
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"no {kind} checkpoint in {mngr.directory}: train first, or check --out_dir")
        try:
            return step, dict(mngr.restore(step, args=ocp.args.Composite(**args)))
        except Exception as e:  # noqa: BLE001 - orbax, tensorstore, json and the OS each raise their own types
            self._damaged(kind, step, f"it is truncated, garbled or incomplete ({_why(e)})", e)

    def _damaged(self, kind, step, what, cause=None):
        message = f"the {kind} checkpoint {self._folder(kind, step)} cannot be used: {what}"
        if kind == "latest":
            best = self.intact("best")
            message += (f"; the best checkpoint (iteration {best}) is intact: use it with --checkpoint=best "
                        "(train: --init_from=resume --checkpoint=best)" if best is not None
                        else "; there is no intact best checkpoint to fall back on")
        raise DamagedCheckpointError(message) from cause

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for mngr in self.managers.values():
                mngr.close()


def _abstract_layer(x: jax.ShapeDtypeStruct, _layer: int) -> jax.ShapeDtypeStruct:
    """One layer of an abstract stacked leaf, placed as the stacked one without its layer axis."""
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def abstract(tree, shardings):
    """Shape/dtype stand-ins for a restore target, each leaf placed with its sharding (a matching tree)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
