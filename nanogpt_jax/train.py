"""Training: nanoGPT's loop around the pure, jitted step of step.py, with data, placement and checkpoints."""

import dataclasses
import math
import time
from pathlib import Path

import jax
import numpy as np
from etils import epath

from . import data, mfu, parallel
from .checkpoint import Checkpointer, RunRecord, refuse_existing_run
from .config import ConfigError, TrainConfig, UserError, options_set
from .control import RunLock, StopRequest
from .load import crop, folder_meta, model_config, runtime, with_runtime
from .memory import (OutOfMemoryError, gib, param_count, per_device_bytes, refuse_unless_it_fits, remat_saves_memory,
                     training_bytes)
from .model import GPTConfig, init_params, num_params
from .optim import OptimConfig, get_lr
from .pretrained import from_pretrained
from .program import CompiledTooBigError, Program
from .step import TrainState
from .tracking import MetricsLog, on_object_store


class Run(Program):
    """A training run: its program (layout, shardings, jitted steps) and the data it reads."""

    def __init__(self, cfg: TrainConfig, config: GPTConfig):
        super().__init__(cfg, config)
        # meta: the vocabulary, kept in checkpoints for sampling
        self.splits, self.meta = data.open_dataset(Path(cfg.data_dir) / cfg.dataset)
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * config.block_size

    def record(self, iter_num: int, best_val_loss: float, best_iter: int | None) -> RunRecord:
        return RunRecord(train=dataclasses.asdict(self.cfg), model=dataclasses.asdict(self.config),
                         meta=self.meta, iter_num=iter_num, best_val_loss=best_val_loss, best_iter=best_iter)

    def _put(self, split: str, starts: np.ndarray, sharding):
        """Global (x, y) arrays of windows at `starts`; each process reads only its own devices' rows."""
        T, read = self.config.block_size, {}

        def windows(index):
            key = repr(index)
            if key not in read:  # x and y of one shard come from one read
                read[key] = data.read_windows(self.splits[split], starts[index[:-1]], T)
            return read[key]

        shape = (*starts.shape, T)
        return tuple(parallel.put_rows(sharding, shape, lambda index, i=i: windows(index)[i]) for i in (0, 1))

    def _starts(self, split: str, shape, *key) -> np.ndarray:
        # The key names process 0 whatever the process: every process draws the same global batch.
        return data.window_starts(len(self.splits[split]), self.config.block_size, shape,
                                  (self.cfg.seed, ("train", "val").index(split), 0, *key))

    def train_batch(self, iter_num: int):
        """The step's batch: gradient_accumulation_steps (A) x batch_size (B) windows, drawn as one global
        batch and laid out as layout.steps micro-batches of layout.rows rows (the same rows, the same update)."""
        A, B, L = self.cfg.gradient_accumulation_steps, self.cfg.batch_size, self.layout
        starts = self._starts("train", (A, B), iter_num).reshape(L.steps, L.rows)
        if not L.pmap:
            return self._put("train", starts, parallel.batch_sharding(self.mesh, 1))
        # pmap: device i takes rows i*R:(i+1)*R of every micro-batch, as the mesh would give it
        n = L.devices
        starts = starts.reshape(L.steps, n, L.rows // n).transpose(1, 0, 2)
        return self._put("train", starts, parallel.device_axis_sharding(self.mesh))

    def estimate_loss(self, params, it: int) -> dict:
        out = {}
        for split in ("train", "val"):
            losses = [self.eval(params, self._put(split, self._starts(split, (self.cfg.batch_size,), it, k),
                                                  self.eval_rows))
                      for k in range(self.cfg.eval_iters)]
            out[split] = float(np.mean(jax.device_get(losses)))
        return out


class NonFiniteLossError(UserError):
    """The loss went NaN or inf: the run stops before anything is saved after it."""


def _refuse_nonfinite(cfg, iter_num: int, loss: float, what: str) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"iteration {iter_num}: the {what} is {loss}; stopped, and the last good checkpoint in {cfg.out_dir} "
            "is kept (nothing was saved after it). Lower --learning_rate, clip gradients (--grad_clip=1.0), or pass "
            "--skip_nonfinite_steps=True to skip such steps")


def _refuse_other_architecture(cfg: TrainConfig, saved: GPTConfig) -> None:
    """A resumed run keeps its checkpoint's architecture: an option the user set to something else is an error."""
    for key in ("model", "n_layer", "n_head", "n_embd", "block_size", "bias"):
        if key in options_set(cfg) and getattr(cfg, key) != getattr(saved, key):
            raise ConfigError(f"--{key}={getattr(cfg, key)!r} but the checkpoint in {cfg.out_dir} has {key}="
                              f"{getattr(saved, key)!r}: a resumed run keeps its architecture; drop the option, "
                              "or train into a new --out_dir")


MEMORY_ADVICE = "use a smaller model or --block_size, a smaller --batch_size or --micro_batch_size, --remat=full, or --fsdp"


def _training(config: GPTConfig, devices: int) -> str:
    return (f"training {param_count(config):,} parameters (n_layer={config.n_layer}, n_embd={config.n_embd}, "
            f"block_size={config.block_size}) on {devices} device(s)")


def _refuse_too_big(cfg: TrainConfig, config: GPTConfig) -> None:
    """Before anything is built, from the config alone: the state and one pass's activations must fit each
    device (an absurd size is refused before its parameters are drawn)."""
    devices = cfg.num_devices or jax.device_count()
    if not remat_saves_memory(config.scan_layers):
        config = dataclasses.replace(config, remat="none")
    need = training_bytes(config, max(1, (cfg.micro_batch_size or cfg.batch_size) // devices), cfg.fsdp)
    refuse_unless_it_fits(need, _training(config, devices), MEMORY_ADVICE, per_device=True)


def _compile_and_check(run: Run) -> str | None:
    """The train step compiled before any state is placed (its first call would compile it anyway), and its
    compiled per-device peak held against one device's memory: a run that cannot fit stops here. Returns the
    line to log once the run has started."""
    if run.layout.pmap:
        return None
    have = per_device_bytes()
    try:
        executable, figures = run.compile_step()
    except CompiledTooBigError as e:
        raise OutOfMemoryError(f"{_training(run.config, run.mesh.size)}: {e}; {MEMORY_ADVICE}") from None
    if figures.peak_bytes > have:
        raise OutOfMemoryError(f"{_training(run.config, run.mesh.size)} needs {gib(figures.peak_bytes)} per device "
                               f"(compiled) and each device has {gib(have)}: {MEMORY_ADVICE}")
    run.step = executable
    return f"compiled the train step in {figures.seconds:.1f} s: {gib(figures.peak_bytes)} per device"


def initial_state(cfg: TrainConfig, ckpt: Checkpointer):
    """(GPTConfig, params, base rng, iter_num, best_val_loss) for cfg.init_from; params and rng are
    None on resume (they are restored once the run's layout is known)."""
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    _, meta = data.open_dataset(dataset_dir)  # fails early if it is not prepared
    options = runtime(cfg)
    if cfg.init_from == "scratch":
        refuse_existing_run(cfg.out_dir, "continue it with --init_from=resume, or train into a new --out_dir")
        config = model_config(cfg, meta["vocab_size"] if meta else 50304)
        _refuse_too_big(cfg, config)
        return config, init_params(config, jax.random.PRNGKey(cfg.seed)), jax.random.PRNGKey(cfg.seed), 0, math.inf
    if cfg.init_from == "resume":
        record = ckpt.record(cfg.checkpoint)
        _refuse_other_architecture(cfg, record.config)
        data.check_vocabulary(record.meta, meta, dataset_dir)
        # The architecture comes from the checkpoint; dropout and the system options from the command line.
        config = with_runtime(record.config, **options)
        _refuse_too_big(cfg, config)
        return config, None, None, record.iter_num, record.best_val_loss
    refuse_existing_run(cfg.out_dir, "finetune into a new --out_dir")
    data.check_vocabulary(folder_meta(cfg.init_from), meta, dataset_dir)
    config, params = from_pretrained(cfg.init_from)
    config = with_runtime(config, **options)
    if cfg.block_size != config.block_size:
        config, params = crop(config, params, cfg.block_size)
    _refuse_too_big(cfg, config)
    return config, params, jax.random.PRNGKey(cfg.seed), 0, math.inf


def _repair_best(ckpt: Checkpointer, run: Run, state, rng, record: RunRecord, log) -> None:
    """A kill between the `latest` and `best` saves of one evaluation leaves `best` older than the record says;
    `latest` holds that evaluation's state, so it is saved as `best` again."""
    if record.best_iter is None or record.best_iter != record.iter_num:
        return
    if (ckpt.latest_step("best") or -1) < record.iter_num:
        saved = run.saved_state(state)
        ckpt.save("best", record.iter_num, saved.params, saved.opt_state, rng, record)
        log(f"saved the best checkpoint of iteration {record.iter_num} again: the run had stopped between its "
            "latest and best saves")


def train(cfg: TrainConfig, log=print) -> dict:
    """Run nanoGPT's training loop; returns {'iter_num', 'best_val_loss', 'last_losses', 'stopped_by'}
    (stopped_by: 'SIGTERM' or 'SIGINT' when a signal stopped it after saving `latest`, else None)."""
    out_dir = epath.Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out_dir={cfg.out_dir} is a file: give a folder (new or a run's)")
    if Path(cfg.data_dir).is_file():
        raise ConfigError(f"--data_dir={cfg.data_dir} is a file: give the folder holding {cfg.dataset}/")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A bucket has no exclusive create: two runs into one gs:// out_dir are not detected.
        lock = RunLock(Path(out_dir)) if jax.process_index() == 0 and not on_object_store(out_dir) else None
    except OSError as e:  # read-only or not ours: before anything is trained
        raise ConfigError(f"--out_dir={cfg.out_dir}: cannot write there ({e.strerror}); give a folder you can "
                          "write to") from e
    try:
        ckpt = Checkpointer(cfg.out_dir)
        stop = StopRequest()
        try:
            return _train(cfg, ckpt, out_dir, log, stop)
        finally:
            stop.restore()
            ckpt.close()
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class Progress:
    """Where a run stands: the next iteration, and the best evaluation so far (the one `best` holds)."""

    iter_num: int
    best_val_loss: float
    best_iter: int | None = None


def _start(cfg: TrainConfig, ckpt: Checkpointer, log) -> tuple[Run, TrainState, jax.Array, Progress]:
    """The run built, its step compiled and checked against the devices' memory, its state restored (a damaged
    `best` repaired) or freshly placed."""
    config, params, rng, iter_num, best_val_loss = initial_state(cfg, ckpt)
    run = Run(cfg, config)
    data.check_splits(Path(cfg.data_dir) / cfg.dataset, run.splits, config.block_size, config.vocab_size)
    compiled = _compile_and_check(run)
    progress = Progress(iter_num, best_val_loss)
    if params is not None:
        state, rng = run.init_state(params), parallel.put_replicated(run.mesh, rng)
    else:
        state, rng = run.restore_state(ckpt, cfg.checkpoint)
    # Logged once the state is in place, so a refused checkpoint prints its one error line and nothing else.
    devices = f"{run.mesh.size} x {run.mesh.devices.flat[0].device_kind}"
    log(f"number of parameters: {num_params(run.abstract_state.params) / 1e6:.2f}M; tokens per iteration: "
        f"{run.tokens_per_iter:,}; devices: {devices}; dtype {config.dtype}")
    log(f"layout: {run.layout.describe()}")
    if config.remat != "none" and not remat_saves_memory(config.scan_layers):
        log("note: --remat saves no memory on a CPU with --scan_layers=False (XLA:CPU merges the recomputation "
            "away); keep the layers scanned, or shard the state with --fsdp")
    if compiled:
        log(compiled)
    if params is not None:
        return run, state, rng, progress
    record = ckpt.record(cfg.checkpoint)
    progress.best_iter = record.best_iter
    if cfg.checkpoint == "best":
        for moved in ckpt.set_aside("latest", after=iter_num):  # later saves would collide with them
            log(f"resuming from the best checkpoint (iteration {iter_num}): moved the later latest checkpoint to "
                f"{moved}")
    else:
        _repair_best(ckpt, run, state, rng, record, log)
    return run, state, rng, progress


def _evaluate(run: Run, ckpt: Checkpointer, state, rng, progress: Progress, start_iter: int, metrics, log) -> dict:
    """nanoGPT's evaluation: both splits' losses, then `latest` (and `best` when val improved) saved, unless
    nothing was trained since the start; always_save_checkpoint=False saves only improvements."""
    cfg, it = run.cfg, progress.iter_num
    saved = run.saved_state(state)
    losses = run.estimate_loss(saved.params, it)
    log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    metrics.log(iter=it, train_loss=losses["train"], val_loss=losses["val"])
    _refuse_nonfinite(cfg, it, losses["val"] + losses["train"], "evaluation loss")
    improved = losses["val"] < progress.best_val_loss
    progress.best_val_loss = min(progress.best_val_loss, losses["val"])
    if it > start_iter and (improved or cfg.always_save_checkpoint):
        # best_iter says what `best` is about to hold: a kill between the two saves is repaired on resume
        # (_repair_best), since `latest` holds the same state
        record = run.record(it, progress.best_val_loss, it if improved else progress.best_iter)
        ckpt.save("latest", it, saved.params, saved.opt_state, rng, record)
        if improved:
            ckpt.save("best", it, saved.params, saved.opt_state, rng, record)
            progress.best_iter = it
        log(f"saving checkpoint to {cfg.out_dir}")
    return losses


class StepLog:
    """Every log_interval: loss, lr, time per iteration since the last line, tokens/s, MFU, skipped steps, and
    float16's loss scale."""

    def __init__(self, run: Run, metrics, log):
        self.run, self.metrics, self.log = run, metrics, log
        config = run.config
        self.peak = mfu.peak_flops(run.mesh.devices.flat[0].device_kind, config.dtype)
        self.flops_per_iter = mfu.flops_per_token(config, num_params(run.abstract_state.params)) * run.tokens_per_iter
        self.restart()

    def restart(self):
        """Time from here: evaluation time is not step time."""
        self.t0, self.timed = time.perf_counter(), 0

    def step(self, iter_num: int, loss, n_skipped, state) -> None:
        self.timed += 1
        if iter_num % self.run.cfg.log_interval:
            return
        loss = float(loss)  # waits for the step: the clock below is honest
        t1 = time.perf_counter()
        dt, tokens = (t1 - self.t0) / self.timed, self.run.tokens_per_iter
        self.t0, self.timed = t1, 0
        lr = float(get_lr(iter_num, OptimConfig.of(self.run.cfg)))
        util = self.flops_per_iter / dt / (self.peak * self.run.mesh.size) if self.peak else None
        skips = {} if n_skipped is None else {"skipped_steps": int(n_skipped)}
        scale = self.run.loss_scale(state)
        scaled = {} if scale is None else {"loss_scale": float(scale)}
        self.log(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.3e}, time {dt * 1000:.2f}ms, {tokens / dt:,.0f} tok/s, "
                 f"mfu {'n/a' if util is None else f'{util * 100:.2f}%'}"
                 + (f", skipped {skips['skipped_steps']} non-finite steps" if skips else "")
                 + (f", loss scale {scaled['loss_scale']:.10g}" if scaled else ""))
        self.metrics.log(iter=iter_num, loss=loss, lr=lr, dt_ms=dt * 1000, tokens_per_sec=tokens / dt, mfu=util,
                         **skips, **scaled)
        if not self.run.cfg.skip_nonfinite_steps:
            _refuse_nonfinite(self.run.cfg, iter_num, loss, "loss")


def _train(cfg, ckpt, out_dir, log, stop):
    run, state, rng, progress = _start(cfg, ckpt, log)
    start_iter, last = progress.iter_num, {}
    wandb = {"project": cfg.wandb_project, "name": cfg.wandb_run_name, "config": dataclasses.asdict(cfg)}
    with MetricsLog(out_dir, resume_iter=start_iter if cfg.init_from == "resume" else None,
                    enabled=jax.process_index() == 0, wandb=wandb if cfg.wandb_log else None) as metrics:
        steps, in_flight, n_skipped = StepLog(run, metrics, log), None, None
        while True:
            it = progress.iter_num
            last_iter = it == cfg.max_iters and it > start_iter
            if last_iter and it % cfg.eval_interval:
                log(f"iteration {it} is the last (max_iters): evaluating and saving it, though eval_interval="
                    f"{cfg.eval_interval} does not fall on it")
            if it % cfg.eval_interval == 0 or cfg.eval_only or last_iter:
                last = _evaluate(run, ckpt, state, rng, progress, start_iter, metrics, log)
                steps.restart()
            if cfg.eval_only or it >= cfg.max_iters:  # eval_only: evaluate where the run stands, then stop
                break
            state, loss = run.step(state, run.train_batch(it), jax.random.fold_in(rng, it))
            if cfg.skip_nonfinite_steps:  # the count stays on the device until a log line reads it
                loss, skipped = loss
                n_skipped = skipped if n_skipped is None else n_skipped + skipped
            # At most two steps in flight: the next batch is still read while a step runs, but the device
            # queue never grows with log_interval (deep queues of collectives starve host-CPU devices).
            jax.block_until_ready(in_flight)
            in_flight = loss
            steps.step(it, loss, n_skipped, state)
            progress.iter_num += 1
            if stop.after(progress.iter_num):  # the step is done: save it as an evaluation would, and stop
                saved = run.saved_state(state)
                ckpt.save("latest", progress.iter_num, saved.params, saved.opt_state, rng,
                          run.record(progress.iter_num, progress.best_val_loss, progress.best_iter))
                log(f"{stop.signal}: saved iteration {progress.iter_num} to {out_dir}; continue with the same "
                    "options and --init_from=resume")
                break
    return {"iter_num": progress.iter_num, "best_val_loss": progress.best_val_loss, "last_losses": last,
            "stopped_by": stop.signal}
