"""A training run's program: its layout over the devices, where every leaf of the state lives, and the
jitted train and eval steps, built alike for this machine's devices (`train`) and for a TPU topology's
(`compile`), where the step is only compiled."""

import dataclasses
import re
import time
from functools import partial

import jax
import numpy as np

from . import parallel
from .checkpoint import Checkpointer, abstract
from .config import TrainConfig, UserError
from .load import abstract_params
from .model import GPTConfig, make_model
from .optim import OptimConfig, make_optimizer
from .step import LossScale, ScaledState, TrainState, accumulate_grads, eval_step, initial_loss_scale, train_step, \
    with_loss_scale


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What XLA says of a compiled program, per device."""

    argument_bytes: int
    temp_bytes: int
    peak_bytes: int  # arguments + temporaries + outputs - what the outputs reuse of the arguments
    flops: float | None
    seconds: float


class CompiledTooBigError(UserError):
    """XLA refused to compile: the program's temporaries alone exceed a device's memory."""

    def __init__(self, temp_bytes: int, have_bytes: int, seconds: float):
        super().__init__(f"the compiler ran out of device memory: temporaries need {temp_bytes / 2**30:,.2f} GiB "
                         f"per device, {have_bytes / 2**30:,.2f} GiB are available")
        self.temp_bytes, self.have_bytes, self.seconds = temp_bytes, have_bytes, seconds


def _gigabytes(text: str) -> int:
    return int(float(text) * 2**30)


def compiled_figures(lower) -> tuple:
    """(executable, Compiled) of the program `lower()` lowers: lower and compile it (both timed) and read its
    memory and cost analyses. A TPU's compiler refuses a program whose temporaries exceed the chip's memory:
    CompiledTooBigError says by how much."""
    t0 = time.perf_counter()
    try:
        executable = lower().compile()
    except jax.errors.JaxRuntimeError as e:
        found = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        raise CompiledTooBigError(_gigabytes(found.group(1)), _gigabytes(found.group(2)),
                                  time.perf_counter() - t0) from None
    seconds = time.perf_counter() - t0
    mem = executable.memory_analysis()
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
    return executable, Compiled(mem.argument_size_in_bytes, mem.temp_size_in_bytes, peak,
                                (cost or {}).get("flops"), seconds)


class Program:
    """The optimizer, layout, shardings and jitted steps of a run of `config` under `cfg`'s options."""

    def __init__(self, cfg: TrainConfig, config: GPTConfig, devices=None):
        self.cfg, self.config = cfg, config
        self.model = make_model(config)
        self.tx = make_optimizer(OptimConfig.of(cfg))
        # float16 gradients need GradScaler's loss scaling; float32 and bfloat16 have float32's exponent range
        self.init_opt = with_loss_scale(self.tx.init) if config.dtype == "float16" else self.tx.init
        self.layout = parallel.plan(cfg.gradient_accumulation_steps, cfg.batch_size, cfg.micro_batch_size,
                                    fsdp=cfg.fsdp, num_devices=cfg.num_devices, pmap=cfg.parallel == "pmap",
                                    devices=devices)
        self.mesh = mesh = self.layout.mesh
        shapes = abstract_params(config)
        abstract_state = TrainState(shapes, jax.eval_shape(self.init_opt, shapes))
        self.shardings = parallel.state_shardings(mesh, abstract_state)  # also the layout checkpoints restore to
        self.abstract_state = abstract(abstract_state, self.shardings)
        self.rep = rep = parallel.replicated(mesh)

        def grads_for(gather):
            return partial(accumulate_grads, model=make_model(config, gather))

        if self.layout.pmap:
            step = jax.pmap(partial(train_step, model=self.model, tx=self.tx, grads_fn=parallel.pmapped_grads(
                grads_for(None)), skip_nonfinite=cfg.skip_nonfinite_steps), axis_name="devices", in_axes=(0, 0, None),
                donate_argnums=0)
            self.step = lambda state, batch, key: _first_loss(step(state, batch, key))
        else:
            grads_fn = parallel.per_device_grads(grads_for, mesh, parallel.state_specs(shapes, self.layout.fsdp))
            self.step = jax.jit(partial(train_step, model=self.model, tx=self.tx, grads_fn=grads_fn,
                                        skip_nonfinite=cfg.skip_nonfinite_steps),
                                donate_argnums=0, in_shardings=(self.shardings, parallel.batch_sharding(mesh, 1), rep),
                                out_shardings=(self.shardings, rep))
        # Evaluation batches split over the devices when batch_size allows it, else every device sees them all.
        self.eval_rows = parallel.batch_sharding(mesh, 0) if cfg.batch_size % mesh.size == 0 else rep
        self.eval = jax.jit(partial(eval_step, model=self.model), in_shardings=(self.shardings.params, self.eval_rows),
                            out_shardings=rep)

    def compile_step(self):
        """(executable, Compiled) of the train step for abstract arguments: nothing is allocated, so it answers
        for a model that would not fit, and for a TPU topology's devices on a CPU machine."""
        L, T = self.layout, self.config.block_size
        batch = jax.ShapeDtypeStruct((L.steps, L.rows, T), np.int32, sharding=parallel.batch_sharding(self.mesh, 1))
        key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=self.rep)
        return compiled_figures(lambda: self.step.lower(self.abstract_state, (batch, batch), key))

    def init_state(self, params) -> TrainState:
        """`params` and a fresh optimizer state, placed as the step wants them."""
        params = jax.device_put(params, self.shardings.params)
        state = TrainState(params, jax.jit(self.init_opt, out_shardings=self.shardings.opt_state)(params))
        return parallel.stack_for_pmap(self.mesh, state) if self.layout.pmap else state

    def restore_state(self, ckpt: Checkpointer, kind: str = "latest") -> tuple[TrainState, jax.Array]:
        """(train state, base rng) of the latest (or best) checkpoint, restored straight onto the step's placement.
        A float16 checkpoint's loss scale is restored; a float16 run from a checkpoint without one (older, or
        trained in another dtype) starts the scale afresh, and a run in another dtype leaves it out."""
        record = ckpt.record(kind)
        saved_scale = record.version >= 4 and record.config.dtype == "float16"  # see checkpoint.RECORD_VERSION
        optimizer = {"opt_state": self._opt_target(saved_scale),
                     "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=self.rep)}
        restored = ckpt.restore(kind, params=self.abstract_state.params, optimizer=optimizer)
        opt_state = restored["optimizer"]["opt_state"]
        if saved_scale and not self.float16:
            opt_state = opt_state.inner
        elif self.float16 and not saved_scale:
            opt_state = ScaledState(opt_state, jax.tree.map(partial(parallel.put_replicated, self.mesh),
                                                            initial_loss_scale()))
        state = TrainState(restored["params"], opt_state)
        return (parallel.stack_for_pmap(self.mesh, state) if self.layout.pmap else state), restored["optimizer"]["rng"]

    @property
    def float16(self) -> bool:
        """Whether the run scales its loss (its optimizer state carries a LossScale)."""
        return isinstance(self.abstract_state.opt_state, ScaledState)

    def _opt_target(self, saved_scale: bool):
        """The abstract optimizer state a checkpoint is read into: this run's, with a loss scale where the
        checkpoint has one."""
        target = self.abstract_state.opt_state
        if self.float16 and not saved_scale:
            return target.inner
        if saved_scale and not self.float16:
            scalars = jax.eval_shape(initial_loss_scale)
            return ScaledState(target, LossScale(*(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.rep)
                                                   for x in scalars)))
        return target

    def loss_scale(self, state: TrainState) -> jax.Array | None:
        """A float16 run's current loss scale (a float32 scalar on the devices); None in other dtypes."""
        if not self.float16:
            return None
        scale = state.opt_state.loss_scale.scale
        return scale[0] if self.layout.pmap else scale  # pmap: one equal copy per device

    def saved_state(self, state: TrainState) -> TrainState:
        """The state as checkpoints and evaluation take it: one copy, without pmap's device axis."""
        return parallel.unstack_from_pmap(self.mesh, state) if self.layout.pmap else state


def _first_loss(out):
    """pmap returns one loss (and skipped flag) per device, all equal after the pmean."""
    state, loss = out
    return state, jax.tree.map(lambda x: x[0], loss)
