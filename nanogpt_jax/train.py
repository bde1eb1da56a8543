"""Training: nanoGPT's loop around the pure, jitted step of step.py. The run is set up by run.py, says how it
goes through step_log.py and saves by saving.py's policy; control.py keeps a second run out and turns signals
into stop requests."""

import dataclasses
from pathlib import Path

import jax
from etils import epath

from .checkpoint import Checkpointer
from .config import ConfigError, TrainConfig
from .control import RunLock, StopRequest
from .run import start
from .saving import evaluate_and_save, save_on_stop
from .step_log import Profile, StepLog
from .tracking import MetricsLog, on_object_store


@jax.jit
def step_key(rng, it):
    """Iteration `it`'s dropout key: one dispatch, where threefry's fold_in run op by op costs ~0.7 ms of host
    time per step."""
    return jax.random.fold_in(rng, it)


def train(cfg: TrainConfig, log=print) -> dict:
    """Run nanoGPT's training loop; returns {'iter_num', 'best_val_loss', 'last_losses', 'stopped_by'}
    (stopped_by: 'SIGTERM' or 'SIGINT' when a signal stopped it after saving `latest`, else None)."""
    out_dir = epath.Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out_dir={cfg.out_dir} is a file: give a folder (new or a run's)")
    if Path(cfg.data_dir).is_file():
        raise ConfigError(f"--data_dir={cfg.data_dir} is a file: give the folder holding {cfg.dataset}/")
    try:
        # A bucket has no exclusive create: two runs into one gs:// out_dir are not detected.
        lock = (RunLock(Path(out_dir), force=cfg.force_unlock)
                if jax.process_index() == 0 and not on_object_store(out_dir) else None)
        out_dir.mkdir(parents=True, exist_ok=True)  # the lock made it, except on other processes and buckets
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


def _train(cfg, ckpt, out_dir, log, stop):
    run, state, rng, progress = start(cfg, ckpt, log)
    start_iter, last = progress.iter_num, {}
    wandb = {"project": cfg.wandb_project, "name": cfg.wandb_run_name, "config": dataclasses.asdict(cfg)}
    with MetricsLog(out_dir, resume_iter=start_iter if cfg.init_from == "resume" else None,
                    enabled=jax.process_index() == 0, wandb=wandb if cfg.wandb_log else None) as metrics:
        steps, profile, in_flight, n_skipped = StepLog(run, metrics, log), Profile(cfg, log), None, None
        while True:
            it = progress.iter_num
            last_iter = it == cfg.max_iters and it > start_iter
            if last_iter and it % cfg.eval_interval:
                log(f"iteration {it} is the last (max_iters): evaluating and saving it, though eval_interval="
                    f"{cfg.eval_interval} does not fall on it")
            if it % cfg.eval_interval == 0 or cfg.eval_only or last_iter:
                last = evaluate_and_save(run, ckpt, state, rng, progress, start_iter, metrics, log)
                steps.restart()
            if run.hellaswag and (it % cfg.hellaswag_interval == 0 or cfg.eval_only or last_iter):
                run.evaluate_hellaswag(state, it, metrics, log)
                steps.restart()
            if cfg.eval_only or it >= cfg.max_iters:  # eval_only: evaluate where the run stands, then stop
                break
            profile.before(it)
            with jax.profiler.StepTraceAnnotation("train", step_num=it):
                state, loss = run.step(state, run.train_batch(it), step_key(rng, it))
            if cfg.skip_nonfinite_steps:  # the count stays on the device until a log line reads it
                loss, skipped = loss
                n_skipped = skipped if n_skipped is None else n_skipped + skipped
            # At most two steps in flight: the next batch is still read while a step runs, but the device
            # queue never grows with log_interval (deep queues of collectives starve host-CPU devices).
            jax.block_until_ready(in_flight)
            in_flight = loss
            if profile.after(it, loss):
                steps.restart()
            steps.step(it, loss, n_skipped, state)
            progress.iter_num += 1
            if stop.after(progress.iter_num):  # the step is done: save it, and stop
                save_on_stop(run, ckpt, state, rng, progress, lambda line: log(f"{stop.signal}: {line}"))
                break
        profile.close()
    return {"iter_num": progress.iter_num, "best_val_loss": progress.best_val_loss, "last_losses": last,
            "stopped_by": stop.signal}
