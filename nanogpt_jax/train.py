"""Training: nanoGPT's loop around a pure, jitted step (forward, backward, gradient accumulation, AdamW)."""

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import data, mfu, parallel
from .checkpoint import CheckpointError, Checkpointer, abstract
from .config import ConfigError, TrainConfig
from .model import GPTConfig, crop_block_size, cross_entropy, init_params, make_model, num_params


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState


def get_lr(it, cfg: TrainConfig):
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate + 0.0 * it
    warm = cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    ratio = jnp.clip((it - cfg.warmup_iters) / max(cfg.lr_decay_iters - cfg.warmup_iters, 1), 0.0, 1.0)
    cosine = cfg.min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
    return jnp.where(it < cfg.warmup_iters, warm, jnp.where(it > cfg.lr_decay_iters, cfg.min_lr, cosine))


def decay_mask(params):
    """Weight decay on matmul and embedding weights only (by name: scanned biases can be 2-D)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(partial(get_lr, cfg=cfg), b1=cfg.beta1, b2=cfg.beta2,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    # Clipping sits before AdamW so it sees the gradient averaged over micro-batches (and devices); the
    # chain keeps one structure with or without it, so a run resumes under another --grad_clip.
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def loss_fn(params, model, x_BT, y_BT, key):
    deterministic = key is None
    logits, _ = model.apply({"params": params}, x_BT, deterministic=deterministic,
                            rngs=None if deterministic else {"dropout": key})
    return cross_entropy(logits, y_BT)


def train_step(state: TrainState, batch, key, *, model, tx):
    """One optimizer update from a batch (x, y) of shape (A, B, T): A micro-batches, gradients averaged."""
    x_ABT, y_ABT = batch
    A = x_ABT.shape[0]
    train = model.config.dropout > 0.0

    def micro_step(grads, xs):
        x_BT, y_BT, k = xs
        loss, g = jax.value_and_grad(loss_fn)(state.params, model, x_BT, y_BT, k if train else None)
        return jax.tree.map(jnp.add, grads, g), loss

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, losses = jax.lax.scan(micro_step, zeros, (x_ABT, y_ABT, jax.random.split(key, A)))
    grads = jax.tree.map(lambda g: g / A, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), jnp.mean(losses)


def eval_step(params, batch, *, model):
    """Mean loss over a batch (x, y) of shape (B, T), dropout off."""
    return loss_fn(params, model, *batch, None)


def resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype={dtype}: use float32, bfloat16, float16 or auto")
    if dtype == "float16" and jax.default_backend() == "cpu":  # XLA:CPU has no float16 attention kernels
        raise ConfigError("--dtype=float16 needs a GPU; on a CPU use float32 or bfloat16")
    return dtype


def check_attn_impl(attn_impl: str | None) -> None:
    if attn_impl == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"--attn_impl=cudnn needs an NVIDIA GPU (this is {jax.default_backend()}); "
                          "leave it unset or use xla")


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, model=cfg.model,
                     dtype=resolve_dtype(cfg.dtype), attn_impl=cfg.attn_impl, remat=cfg.remat)


class Run:
    """What a training run is made of: data, model, optimizer, jitted functions, placement."""

    def __init__(self, cfg: TrainConfig, config: GPTConfig):
        self.cfg, self.config = cfg, config
        # meta: the vocabulary, kept in checkpoints for sampling
        self.splits, self.meta = data.open_dataset(Path(cfg.data_dir) / cfg.dataset)
        self.model = make_model(config)
        self.tx = make_optimizer(cfg)
        self.micro_batch_size = cfg.micro_batch_size or cfg.batch_size
        if self.micro_batch_size < 0 or cfg.batch_size % self.micro_batch_size:
            raise ConfigError(f"--micro_batch_size={cfg.micro_batch_size} must divide --batch_size={cfg.batch_size}")
        self.mesh = parallel.data_mesh(self.micro_batch_size, cfg.num_devices)
        rep = parallel.replicated(self.mesh)
        self.step = jax.jit(partial(train_step, model=self.model, tx=self.tx), donate_argnums=0,
                            in_shardings=(rep, parallel.batch_sharding(self.mesh, 1), rep), out_shardings=rep)
        self.eval = jax.jit(partial(eval_step, model=self.model),
                            in_shardings=(rep, parallel.batch_sharding(self.mesh, 0)), out_shardings=rep)

    def init_state(self, params) -> TrainState:
        """Fresh optimizer state for `params`, both replicated over the mesh."""
        params = jax.device_put(params, parallel.replicated(self.mesh))
        return TrainState(params, jax.jit(self.tx.init, out_shardings=parallel.replicated(self.mesh))(params))

    def windows(self, split: str, shape, *key):
        """Host (x, y) windows of `shape + (T,)`, chosen as a pure function of (seed, split, process, key...)."""
        return data.get_batch(self.splits[split], self.config.block_size, shape,
                              (self.cfg.seed, ("train", "val").index(split), jax.process_index(), *key))

    def train_batch(self, iter_num: int):
        """The step's (A * B / M, M, T) micro-batches: gradient_accumulation_steps (A) batches of
        batch_size (B) rows, each cut into micro_batch_size (M) pieces (the same update, less memory)."""
        A, B, M = self.cfg.gradient_accumulation_steps, self.cfg.batch_size, self.micro_batch_size
        shape = (A * B // M, M, self.config.block_size)
        x, y = self.windows("train", (A, B), iter_num)
        return parallel.put_batch(self.mesh, 1, x.reshape(shape), y.reshape(shape))

    def estimate_loss(self, params, it: int) -> dict:
        out = {}
        for split in ("train", "val"):
            batches = (self.windows(split, (self.cfg.batch_size,), it, k) for k in range(self.cfg.eval_iters))
            losses = [self.eval(params, parallel.put_batch(self.mesh, 0, *b)) for b in batches]
            out[split] = float(np.mean(jax.device_get(losses)))
        return out


def initial_state(cfg: TrainConfig, ckpt: Checkpointer):
    """(GPTConfig, params, base rng, iter_num, best_val_loss) for cfg.init_from; params and rng are
    None on resume (they are restored once the run's layout is known)."""
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    _, meta = data.open_dataset(dataset_dir)  # fails early if it is not prepared
    if cfg.init_from == "scratch":
        if ckpt.has_checkpoints():
            raise CheckpointError(f"{cfg.out_dir} already holds a run's checkpoints: continue it with "
                                  "--init_from=resume, or train into a new --out_dir")
        config = model_config(cfg, meta["vocab_size"] if meta else 50304)
        return config, init_params(config, jax.random.PRNGKey(cfg.seed)), jax.random.PRNGKey(cfg.seed), 0, math.inf
    if cfg.init_from == "resume":
        record = ckpt.record("latest")
        data.check_vocabulary(record["meta"], meta, dataset_dir)
        # The architecture comes from the checkpoint; dropout and the system options from the command line.
        saved = GPTConfig(**record["model"])
        config = dataclasses.replace(saved, dropout=cfg.dropout, dtype=resolve_dtype(cfg.dtype),
                                     attn_impl=cfg.attn_impl, remat=cfg.remat)
        return config, None, None, record["iter_num"], record["best_val_loss"]
    from .convert import folder_meta
    from .pretrained import from_pretrained

    if ckpt.has_checkpoints():
        raise CheckpointError(f"{cfg.out_dir} already holds a run's checkpoints: finetune into a new --out_dir")
    data.check_vocabulary(folder_meta(cfg.init_from), meta, dataset_dir)
    config, params = from_pretrained(cfg.init_from, dtype=resolve_dtype(cfg.dtype))
    config = dataclasses.replace(config, dropout=cfg.dropout, attn_impl=cfg.attn_impl, remat=cfg.remat)
    if cfg.block_size != config.block_size:
        config, params = crop_block_size(config, params, cfg.block_size)
    return config, params, jax.random.PRNGKey(cfg.seed), 0, math.inf


def train(cfg: TrainConfig, log=print) -> dict:
    """Run nanoGPT's training loop; returns {'iter_num', 'best_val_loss', 'last_losses'}."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(cfg.out_dir)
    try:
        return _train(cfg, ckpt, out_dir, log)
    finally:
        ckpt.close()


def _train(cfg, ckpt, out_dir, log):
    check_attn_impl(cfg.attn_impl)
    config, params, rng, iter_num, best_val_loss = initial_state(cfg, ckpt)
    run = Run(cfg, config)
    # An id past the embedding table would read NaNs, not fail: check the (small) val split up front.
    top = int(run.splits["val"].max())
    if top >= config.vocab_size:
        raise data.DataError(f"{cfg.data_dir}/{cfg.dataset} holds token id {top:,} and the model has "
                             f"{config.vocab_size:,} ids: use a dataset tokenized for this model")
    rep = parallel.replicated(run.mesh)
    if params is None:  # resume: restore everything onto the replicated layout
        shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
        optimizer = {"opt_state": jax.eval_shape(run.tx.init, shapes), "rng": jax.random.PRNGKey(0)}
        restored = ckpt.restore("latest", params=abstract(shapes, rep), optimizer=abstract(optimizer, rep))
        state = TrainState(restored["params"], restored["optimizer"]["opt_state"])
        rng = restored["optimizer"]["rng"]
    else:
        state = run.init_state(params)
    start_iter = iter_num
    n_params = num_params(state.params)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * config.block_size
    peak = mfu.peak_flops(run.mesh.devices.flat[0].device_kind, config.dtype)
    flops_per_iter = mfu.flops_per_token(config, n_params) * tokens_per_iter
    log(f"number of parameters: {n_params / 1e6:.2f}M; tokens per iteration: {tokens_per_iter:,}; "
        f"devices: {run.mesh.size} x {run.mesh.devices.flat[0].device_kind}; dtype {config.dtype}")
    with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as metrics:
        last = {}
        t0, timed, in_flight = time.perf_counter(), 0, None
        while True:
            if iter_num % cfg.eval_interval == 0:
                losses = run.estimate_loss(state.params, iter_num)
                log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                _write(metrics, iter=iter_num, train_loss=losses["train"], val_loss=losses["val"])
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > start_iter and (improved or cfg.always_save_checkpoint):  # nothing new at the start
                    record = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(config),
                              "meta": run.meta, "iter_num": iter_num, "best_val_loss": best_val_loss}
                    ckpt.save("latest", iter_num, state.params, state.opt_state, rng, record)
                    if improved:
                        ckpt.save("best", iter_num, state.params, state.opt_state, rng, record)
                    log(f"saving checkpoint to {out_dir}")
                last = losses
                t0, timed = time.perf_counter(), 0  # evaluation time is not step time
            if (iter_num == 0 and cfg.eval_only) or iter_num >= cfg.max_iters:
                break
            state, loss = run.step(state, run.train_batch(iter_num), jax.random.fold_in(rng, iter_num))
            # At most two steps in flight: the next batch is still read while a step runs, but the device
            # queue never grows with log_interval (deep queues of collectives starve host-CPU devices).
            jax.block_until_ready(in_flight)
            in_flight = loss
            timed += 1
            if iter_num % cfg.log_interval == 0:
                loss = float(loss)  # waits for the step: the clock below is honest
                t1 = time.perf_counter()
                dt = (t1 - t0) / timed
                t0, timed = t1, 0
                lr = float(get_lr(iter_num, cfg))
                util = flops_per_iter / dt / (peak * run.mesh.size) if peak else None
                log(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.3e}, time {dt * 1000:.2f}ms, "
                    f"{tokens_per_iter / dt:,.0f} tok/s, mfu {'n/a' if util is None else f'{util * 100:.2f}%'}")
                _write(metrics, iter=iter_num, loss=loss, lr=lr, dt_ms=dt * 1000,
                       tokens_per_sec=tokens_per_iter / dt, mfu=util)
            iter_num += 1
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "last_losses": last}


def _write(f, **record):
    f.write(json.dumps(record) + "\n")
    f.flush()
