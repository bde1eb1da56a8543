"""What a run says as it trains: every log_interval the loss, lr, time per iteration, tokens/s, MFU and
skipped steps, in the log and metrics.jsonl; a loss gone NaN or inf stops the run (saving.refuse_nonfinite)."""

import time
from pathlib import Path

import jax

from . import mfu
from .config import TrainConfig, profile_range
from .model import num_params
from .optim import OptimConfig, get_lr
from .saving import refuse_nonfinite


class StepLog:
    """Every log_interval: loss, lr, time per iteration since the last line, tokens/s, MFU, skipped steps, and
    float16's loss scale."""

    def __init__(self, run, metrics, log):
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
            refuse_nonfinite(self.run.cfg, iter_num, loss, "loss")


class Profile:
    """--profile=START:STOP: a jax.profiler trace of iterations START..STOP-1 in out_dir/profile, which
    TensorBoard's profile plugin and Perfetto open (perfetto_trace.json.gz); each step is annotated with its
    iteration."""

    def __init__(self, cfg: TrainConfig, log):
        self.steps, self.folder = profile_range(cfg.profile), Path(cfg.out_dir) / "profile"
        self.log, self.tracing = log, False

    def before(self, iter_num: int) -> None:
        if self.steps and not self.tracing and iter_num in self.steps:
            jax.profiler.start_trace(str(self.folder), create_perfetto_trace=True)
            self.tracing = True

    def after(self, iter_num: int, loss) -> bool:
        """True when this step ended the trace (writing it is no step's time)."""
        if self.tracing and iter_num + 1 >= self.steps.stop:
            jax.block_until_ready(loss)  # the last traced step's work inside the trace
            self.close()
            self.log(f"profile of iterations {self.steps.start}..{iter_num} written to {self.folder}: "
                     f"tensorboard --logdir {self.folder} (its profile plugin), or perfetto_trace.json.gz in "
                     "https://ui.perfetto.dev")
            return True
        return False

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False

