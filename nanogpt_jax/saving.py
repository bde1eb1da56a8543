"""nanoGPT's save policy: at each evaluation `latest` (always, or only on improvement) and `best` (on
improvement); a stop request saves `latest`; a kill between the two saves of one evaluation is repaired; a
loss gone NaN or inf stops the run before anything is saved after it.

`run` is run.Run: the state's saved form (saved_state), its record (record), its evaluation (estimate_loss)."""

import math

from .checkpoint import Checkpointer, RunRecord, last_saved
from .config import UserError


class NonFiniteLossError(UserError):
    """The loss went NaN or inf: the run stops before anything is saved after it."""


def refuse_nonfinite(cfg, iter_num: int, loss: float, what: str) -> None:
    if not math.isfinite(loss):
        kept = last_saved(cfg.out_dir)
        kept = ("no checkpoint had been saved" if kept is None else
                f"the last good checkpoint in {cfg.out_dir} (iteration {kept}) is kept (nothing was saved after it)")
        raise NonFiniteLossError(
            f"iteration {iter_num}: the {what} is {loss}; stopped, and {kept}. Lower --learning_rate, clip gradients "
            "(--grad_clip=1.0), or pass --skip_nonfinite_steps=True to skip such steps")


def evaluate_and_save(run, ckpt: Checkpointer, state, rng, progress, start_iter: int, metrics, log) -> dict:
    """nanoGPT's evaluation: both splits' losses, then `latest` (and `best` when val improved) saved, unless
    nothing was trained since the start; always_save_checkpoint=False saves only improvements."""
    cfg, it = run.cfg, progress.iter_num
    saved = run.saved_state(state)
    losses = run.estimate_loss(saved.params, it)
    log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    metrics.log(iter=it, train_loss=losses["train"], val_loss=losses["val"])
    refuse_nonfinite(cfg, it, losses["val"] + losses["train"], "evaluation loss")
    improved = losses["val"] < progress.best_val_loss
    progress.best_val_loss = min(progress.best_val_loss, losses["val"])
    if it > start_iter and (improved or cfg.always_save_checkpoint):
        # best_iter says what `best` is about to hold: a kill between the two saves is repaired on resume
        # (repair_best), since `latest` holds the same state
        record = run.record(it, progress.best_val_loss, it if improved else progress.best_iter)
        ckpt.save("latest", it, saved.params, saved.opt_state, rng, record)
        if improved:
            ckpt.save("best", it, saved.params, saved.opt_state, rng, record)
            progress.best_iter = it
        log(f"saving checkpoint to {cfg.out_dir}")
    return losses


def repair_best(ckpt: Checkpointer, run, state, rng, record: RunRecord, log) -> None:
    """A kill between the `latest` and `best` saves of one evaluation leaves `best` older than the record says;
    `latest` holds that evaluation's state, so it is saved as `best` again."""
    if record.best_iter is None or record.best_iter != record.iter_num:
        return
    if (ckpt.latest_step("best") or -1) < record.iter_num:
        saved = run.saved_state(state)
        ckpt.save("best", record.iter_num, saved.params, saved.opt_state, rng, record)
        log(f"saved the best checkpoint of iteration {record.iter_num} again: the run had stopped between its "
            "latest and best saves")


def save_on_stop(run, ckpt: Checkpointer, state, rng, progress, log) -> None:
    """A stop request after a finished step: `latest` saved as an evaluation would save it."""
    saved = run.saved_state(state)
    ckpt.save("latest", progress.iter_num, saved.params, saved.opt_state, rng,
              run.record(progress.iter_num, progress.best_val_loss, progress.best_iter))
    log(f"saved iteration {progress.iter_num} to {run.cfg.out_dir}; continue with the same options and "
        "--init_from=resume")
