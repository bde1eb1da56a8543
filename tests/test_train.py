"""Training against nanoGPT: its lr schedule written out, a numpy AdamW with torch.optim.AdamW's semantics,
nanoGPT's weight-decay rule (dim >= 2), gradient accumulation as one big batch, checkpoints and resumption
bit for bit, and the loss actually falling on Tiny Shakespeare."""

import dataclasses
import json
import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from nanogpt_jax import load_checkpoint
from nanogpt_jax.checkpoint import Checkpointer, CheckpointError
from nanogpt_jax.load import load_run, model_config, resolve_dtype
from nanogpt_jax.optim import decay_mask, get_lr, make_optimizer
from nanogpt_jax.step import TrainState, train_step
from nanogpt_jax.config import ConfigError, TrainConfig, parse
from nanogpt_jax.data import DataError
from nanogpt_jax.model import GPTConfig, init_params, make_model
from nanogpt_jax.train import Run, train


def quiet(*_):
    pass


def tiny_cfg(data_dir, out_dir, **kw) -> TrainConfig:
    base = dict(dataset="shakespeare_char", data_dir=str(data_dir), out_dir=str(out_dir), n_layer=2, n_head=2,
                n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=1, eval_iters=2,
                eval_interval=10, log_interval=1, max_iters=20, learning_rate=1e-3, warmup_iters=5,
                lr_decay_iters=20, min_lr=1e-4, dropout=0.0, dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out_dir):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def as_numpy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture
def spy_saves(monkeypatch):
    """Records (kind, iter_num, params as numpy, record) for every checkpoint save."""
    saves = []
    original = Checkpointer.save

    def save(self, kind, iter_num, params, opt_state, rng, record):
        saves.append((kind, iter_num, as_numpy(params), record))
        return original(self, kind, iter_num, params, opt_state, rng, record)

    monkeypatch.setattr(Checkpointer, "save", save)
    return saves


# ----------------------------------------------------------------------------------------------------------
# learning-rate schedule


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's train.py get_lr, verbatim."""
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("sched", [(1e-3, 10, 100, 1e-4), (6e-4, 20, 60, 6e-5), (1e-2, 0, 30, 0.0)])
def test_lr_schedule_equals_nanogpt(sched):
    lr, warmup, decay, min_lr = sched
    cfg = TrainConfig(learning_rate=lr, warmup_iters=warmup, lr_decay_iters=decay, min_lr=min_lr)
    steps = np.arange(decay + 51)
    ref = np.array([nanogpt_get_lr(int(i), lr, warmup, decay, min_lr) for i in steps])
    # float32 arithmetic: with min_lr = 0 the last cosine steps approach 0 and lose relative precision,
    # so the absolute slack is 1e-7 of the peak lr (with min_lr > 0 rtol alone decides)
    atol = 1e-7 * lr if min_lr == 0 else 0.0
    ours = np.array([float(get_lr(int(i), cfg)) for i in steps])  # python ints, as the loop logs it
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=atol)
    traced = np.asarray(jax.jit(jax.vmap(partial(get_lr, cfg=cfg)))(jnp.asarray(steps, jnp.int32)))
    np.testing.assert_allclose(traced, ref, rtol=1e-6, atol=atol)  # int32 counts, as optax calls it


def test_lr_constant_without_decay():
    cfg = TrainConfig(learning_rate=3e-4, decay_lr=False, warmup_iters=10, lr_decay_iters=50, min_lr=1e-5)
    np.testing.assert_allclose([float(get_lr(i, cfg)) for i in range(100)], 3e-4, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(jax.vmap(partial(get_lr, cfg=cfg))(jnp.arange(100))), 3e-4, rtol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# AdamW, clipping, weight-decay mask


def torch_adamw_reference(params, grad_seq, lrs, beta1, beta2, weight_decay, grad_clip, decay, eps=1e-8):
    """torch.optim.AdamW (as nanoGPT configures it) + torch.nn.utils.clip_grad_norm_, in float64 numpy.
    `decay` maps each leaf to True (decayed group) or False (no-decay group)."""
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    out = []
    for t, (grads, lr) in enumerate(zip(grad_seq, lrs, strict=True), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        if grad_clip > 0:
            total_norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
            clip_coef = min(grad_clip / (total_norm + 1e-6), 1.0)
            g = {k: x * clip_coef for k, x in g.items()}
        for k in p:
            if decay[k]:
                p[k] *= 1 - lr * weight_decay
            m[k] = beta1 * m[k] + (1 - beta1) * g[k]
            v2[k] = beta2 * v2[k] + (1 - beta2) * g[k] ** 2
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
            denom = np.sqrt(v2[k]) / math.sqrt(bc2) + eps
            p[k] -= lr / bc1 * m[k] / denom
        out.append({k: x.copy() for k, x in p.items()})
    return out


def flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_optimizer_equals_torch_adamw(grad_clip):
    cfg = TrainConfig(learning_rate=1e-2, warmup_iters=2, lr_decay_iters=6, min_lr=1e-3, weight_decay=0.1,
                      beta1=0.9, beta2=0.95, grad_clip=grad_clip)
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, bias=True)
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    n_steps = 4
    # gradients big enough that clipping acts on some steps and not on others
    scales = [3.0, 0.001, 1.0, 0.02]
    grad_seq = [jax.tree.map(lambda x, s=s: (s * rng.standard_normal(x.shape)).astype(np.float32), params)
                for s in scales]
    lrs = [nanogpt_get_lr(i, 1e-2, 2, 6, 1e-3) for i in range(n_steps)]
    # nanoGPT's configure_optimizers: parameters with dim >= 2 are decayed, the others not
    decay = {k: x.ndim >= 2 for k, x in flat(params).items()}
    ref = torch_adamw_reference(flat(params), [flat(g) for g in grad_seq], lrs, 0.9, 0.95, 0.1, grad_clip, decay)

    tx = make_optimizer(cfg)
    state, p = tx.init(params), params
    update = jax.jit(tx.update)
    for t in range(n_steps):
        updates, state = update(grad_seq[t], state, p)
        p = optax.apply_updates(p, updates)
        for k, x in flat(p).items():
            np.testing.assert_allclose(x, ref[t][k], rtol=2e-5, atol=1e-7, err_msg=f"step {t} {k}")


def test_first_adam_step_size_is_the_scheduled_lr():
    """Adam's first step is lr * g / (|g| + eps): for |g| >> eps, exactly lr * sign(g), lr = get_lr(0)."""
    cfg = TrainConfig(learning_rate=6e-4, warmup_iters=9, lr_decay_iters=100, min_lr=6e-5, weight_decay=0.0,
                      grad_clip=0.0)
    params = {"w": {"kernel": jnp.zeros((4, 5))}}
    g = np.random.default_rng(1).choice([-1.0, 1.0], (4, 5)) * np.random.default_rng(2).uniform(0.1, 5, (4, 5))
    tx = make_optimizer(cfg)
    updates, _ = tx.update({"w": {"kernel": jnp.asarray(g, jnp.float32)}}, tx.init(params), params)
    expected_lr = 6e-4 * 1 / 10  # nanoGPT warmup at it=0: learning_rate * (0 + 1) / (warmup_iters + 1)
    np.testing.assert_allclose(np.asarray(updates["w"]["kernel"]), -expected_lr * np.sign(g), rtol=1e-6)


def test_decay_mask_is_nanogpts_dim_rule():
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8, bias=True)
    params = init_params(config, jax.random.PRNGKey(0))
    mask = flat(decay_mask(params))
    shapes = flat(params)
    assert mask.keys() == shapes.keys()
    for k, decayed in mask.items():
        assert bool(decayed) == (shapes[k].ndim >= 2), k  # nanoGPT: decay exactly the >= 2-D tensors
        named = any(f"['{n}']" in k for n in ("wte", "wpe", "c_attn", "c_proj", "c_fc"))
        assert bool(decayed) == (named and (k.endswith("['kernel']") or k.endswith("['embedding']"))), k
    assert sum(mask.values()) == 2 + 2 * 4  # wte, wpe, and per layer c_attn, attn.c_proj, c_fc, mlp.c_proj
    # stacked (scanned) layers make biases 2-D: the mask goes by name, not by ndim
    stacked = {"h": {"ln_1": {"scale": jnp.ones((2, 8))}, "c_fc": {"bias": jnp.zeros((2, 8)),
                                                                    "kernel": jnp.ones((2, 8, 8))}}}
    assert flat(decay_mask(stacked)) == {"['h']['c_fc']['bias']": False, "['h']['c_fc']['kernel']": True,
                                         "['h']['ln_1']['scale']": False}


def test_weight_decay_applies_to_kernels_not_biases():
    cfg = TrainConfig(learning_rate=1e-2, decay_lr=False, weight_decay=0.1, grad_clip=1.0)
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, bias=True)
    params = jax.tree.map(lambda x: x + 0.5, init_params(config, jax.random.PRNGKey(0)))  # nonzero biases
    tx = make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = flat(optax.apply_updates(params, updates))
    for k, x in flat(params).items():
        # a zero gradient leaves Adam's step at 0: only decoupled decay, p * (1 - lr * wd), moves a weight
        expected = x * (1 - 1e-2 * 0.1) if x.ndim >= 2 else x
        np.testing.assert_allclose(new[k], expected, rtol=1e-6, err_msg=k)
        if x.ndim < 2:
            np.testing.assert_array_equal(new[k], x)


# ----------------------------------------------------------------------------------------------------------
# the step: gradient accumulation, no recompilation


def test_micro_batches_equal_one_big_batch():
    k, b, T = 4, 2, 16
    config = GPTConfig(block_size=T, vocab_size=65, n_layer=1, n_head=2, n_embd=32, bias=False)
    model = make_model(config)
    cfg = TrainConfig(learning_rate=1e-3, decay_lr=False, weight_decay=0.1, grad_clip=1.0)
    tx = make_optimizer(cfg)
    params = init_params(config, jax.random.PRNGKey(0))
    win = np.random.default_rng(0).integers(0, 65, (k * b, T + 1)).astype(np.int32)
    x, y = win[:, :-1], win[:, 1:]
    step = jax.jit(partial(train_step, model=model, tx=tx))
    key = jax.random.PRNGKey(1)
    results = []
    for shape in [(k, b, T), (1, k * b, T)]:
        state = TrainState(params, tx.init(params))
        for _ in range(2):
            state, loss = step(state, (jnp.asarray(x.reshape(shape)), jnp.asarray(y.reshape(shape))), key)
        results.append((state, float(loss)))
    (s_small, l_small), (s_big, l_big) = results
    np.testing.assert_allclose(l_small, l_big, rtol=1e-5)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-6),
                 s_small.params, s_big.params)
    # and the loss is the plain mean cross-entropy of the updated params on all k*b rows, recomputed in numpy
    logits = np.asarray(model.apply({"params": s_big.params}, jnp.asarray(x))[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, y[..., None], -1).mean()
    _, loss_after = step(state, (jnp.asarray(x.reshape(k, b, T)), jnp.asarray(y.reshape(k, b, T))), key)
    np.testing.assert_allclose(float(loss_after), ref, rtol=1e-5)


def test_micro_batch_size_gives_the_same_training(char_data, tmp_path):
    """--micro_batch_size cuts each batch into pieces whose gradients are averaged: the same updates."""
    data_dir, _ = char_data
    runs = {}
    for m in (0, 2):
        cfg = tiny_cfg(data_dir, tmp_path / f"m{m}", n_layer=1, batch_size=8, micro_batch_size=m,
                       gradient_accumulation_steps=2, max_iters=5, eval_interval=5, eval_iters=1,
                       learning_rate=1e-3, warmup_iters=0)
        train(cfg, log=quiet)
        runs[m] = ([x["loss"] for x in read_metrics(cfg.out_dir) if "loss" in x], load_checkpoint(cfg.out_dir)[1])
    np.testing.assert_allclose(runs[2][0], runs[0][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5),
                 runs[2][1], runs[0][1])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        train(tiny_cfg(data_dir, tmp_path / "bad", batch_size=8, micro_batch_size=3), log=quiet)


def test_jitted_step_compiles_once(char_data, tmp_path):
    data_dir, _ = char_data
    cfg = tiny_cfg(data_dir, tmp_path, gradient_accumulation_steps=2, dropout=0.1)
    config = model_config(cfg, 65)
    run = Run(cfg, config)
    state = run.init_state(init_params(config, jax.random.PRNGKey(0)))  # placed as train() places it
    rng = jax.random.PRNGKey(cfg.seed)
    compiles = []  # every XLA compilation in this process, from jax's public monitoring events

    def on_event(name, _secs, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        losses = []
        for it in range(5):
            if it == 1:
                compiles.clear()  # the first iteration compiles the step (and the batch/key helpers)
            state, loss = run.step(state, run.train_batch(it), jax.random.fold_in(rng, it))
            losses.append(float(loss))
            if hasattr(run.step, "_cache_size"):
                assert run.step._cache_size() == 1, f"recompiled at iteration {it}"
        assert compiles == [], f"{len(compiles)} compilations after the first step"
        run.estimate_loss(state.params, 0)
        compiles.clear()
        run.estimate_loss(state.params, 5)
        assert compiles == [], "evaluation recompiled"
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert all(np.isfinite(losses)) and abs(losses[0] - math.log(65)) < 0.2  # uniform-ish start: ln(65)


# ----------------------------------------------------------------------------------------------------------
# checkpoints and resuming


@pytest.fixture(scope="module")
def run_a(char_data, tmp_path_factory):
    """The uninterrupted run: 20 iterations, dropout on, a checkpoint every 10; saved params recorded."""
    data_dir, _ = char_data
    out = tmp_path_factory.mktemp("run_a")
    cfg = tiny_cfg(data_dir, out, dropout=0.1, gradient_accumulation_steps=2, always_save_checkpoint=True)
    saves = []
    original = Checkpointer.save

    def save(self, kind, iter_num, params, opt_state, rng, record):
        saves.append((kind, iter_num, as_numpy(params), record))
        return original(self, kind, iter_num, params, opt_state, rng, record)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "save", save)
        result = train(cfg, log=quiet)
    return cfg, out, saves, result


def test_checkpoint_round_trip(run_a):
    cfg, out, saves, result = run_a
    assert result["iter_num"] == 20
    latest = [s for s in saves if s[0] == "latest"]
    assert [s[1] for s in latest] == [10, 20]
    config, params = load_checkpoint(str(out))
    assert_trees_equal(params, latest[-1][2])
    # the architecture is the one trained
    assert config == GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.1,
                               bias=False, model="gpt", dtype="float32", attn_impl=None, remat=False)
    # best: the last improving evaluation's params
    best = [s for s in saves if s[0] == "best"]
    config_b, params_b = load_checkpoint(str(out), "best")
    assert config_b == config
    assert_trees_equal(params_b, best[-1][2])
    evals = {m["iter"]: m["val_loss"] for m in read_metrics(out) if "val_loss" in m}
    running = evals[0]
    improving = []
    for it in (10, 20):
        if evals[it] < running:
            improving.append(it)
            running = evals[it]
    assert [s[1] for s in best] == improving
    # the restored params give the logged val loss on the same val batches
    run = Run(cfg, config)
    assert run.estimate_loss(params, 20)["val"] == pytest.approx(evals[20], rel=1e-6)
    _, _, record = load_run(str(out))
    assert record.iter_num == 20 and record.meta["vocab_size"] == 65 and len(record.meta["itos"]) == 65
    assert record.train == dataclasses.asdict(cfg)


def test_resume_equals_uninterrupted(run_a, tmp_path):
    cfg_a, out_a, _, _ = run_a
    cfg_b = dataclasses.replace(cfg_a, out_dir=str(tmp_path), max_iters=10)
    train(cfg_b, log=quiet)
    train(dataclasses.replace(cfg_b, init_from="resume", max_iters=20), log=quiet)
    a, b = read_metrics(out_a), read_metrics(tmp_path)
    steps_a = {m["iter"]: (m["loss"], m["lr"]) for m in a if "loss" in m}
    steps_b = {m["iter"]: (m["loss"], m["lr"]) for m in b if "loss" in m}
    assert sorted(steps_a) == sorted(steps_b) == list(range(20))
    for it in range(20):
        assert steps_b[it] == steps_a[it], f"iteration {it}: {steps_b[it]} != {steps_a[it]}"
    evals_a = [(m["iter"], m["train_loss"], m["val_loss"]) for m in a if "val_loss" in m]
    evals_b = [(m["iter"], m["train_loss"], m["val_loss"]) for m in b if "val_loss" in m]
    assert evals_a[-1][0] == 20 and evals_b[-1] == evals_a[-1]
    assert_trees_equal(load_checkpoint(str(tmp_path))[1], load_checkpoint(str(out_a))[1])
    # the logged lr is nanoGPT's schedule
    for it in range(20):
        assert steps_a[it][1] == pytest.approx(nanogpt_get_lr(it, 1e-3, 5, 20, 1e-4), rel=1e-6)


def test_resume_without_checkpoint_is_a_user_error(char_data, tmp_path):
    data_dir, _ = char_data
    with pytest.raises(CheckpointError, match="no latest checkpoint"):
        train(tiny_cfg(data_dir, tmp_path, init_from="resume"), log=quiet)
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        load_checkpoint(str(tmp_path / "never_trained"))
    assert not (tmp_path / "never_trained").exists()


SCRIPTED_VAL = {0: 4.0, 2: 3.0, 4: 3.5, 6: 2.5, 8: 2.8}


@pytest.mark.parametrize("always_save", [False, True])
def test_best_and_latest_semantics(char_data, tmp_path, monkeypatch, spy_saves, always_save):
    """With scripted val losses: `best` holds the lowest-val iteration; `latest` every evaluation
    (always_save_checkpoint=True) or only the improving ones (False)."""
    data_dir, _ = char_data
    monkeypatch.setattr(Run, "estimate_loss", lambda self, params, it: {"train": 9.0, "val": SCRIPTED_VAL[it]})
    cfg = tiny_cfg(data_dir, tmp_path, n_layer=1, n_head=1, n_embd=16, block_size=8, batch_size=2,
                   max_iters=8, eval_interval=2, always_save_checkpoint=always_save)
    result = train(cfg, log=quiet)
    # nanoGPT's rule, with the best kept apart: save at iter > 0 when val improves or always_save_checkpoint
    expected, best_so_far = [], math.inf
    for it, val in SCRIPTED_VAL.items():
        improved = val < best_so_far
        best_so_far = min(best_so_far, val)
        if it > 0 and (improved or always_save):
            expected.append(("latest", it))
            if improved:
                expected.append(("best", it))
    assert [(k, i) for k, i, _, _ in spy_saves] == expected
    assert result["best_val_loss"] == 2.5
    _, params_best, rec_best = load_run(str(tmp_path), "best")
    assert rec_best.iter_num == 6 and rec_best.best_val_loss == 2.5
    assert_trees_equal(params_best, next(p for k, i, p, _ in spy_saves if (k, i) == ("best", 6)))
    _, params_latest, rec_latest = load_run(str(tmp_path), "latest")
    last = expected[-1][1] if expected[-1][0] == "latest" else expected[-2][1]
    assert rec_latest.iter_num == (8 if always_save else 6) == last
    assert rec_latest.best_val_loss == 2.5
    assert_trees_equal(params_latest, next(p for k, i, p, _ in spy_saves if (k, i) == ("latest", last)))
    # one step directory per kind (max_to_keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "best").iterdir() if p.name.isdigit()) == ["6"]


# ----------------------------------------------------------------------------------------------------------
# the loss falls


def test_gpt_loss_falls_on_shakespeare_char(char_data, tmp_path):
    data_dir, _ = char_data
    cfg = tiny_cfg(data_dir, tmp_path, n_layer=2, n_head=4, n_embd=64, block_size=32, batch_size=16,
                   max_iters=200, eval_interval=200, eval_iters=8, log_interval=50, learning_rate=1e-2,
                   warmup_iters=10, lr_decay_iters=200, min_lr=1e-3)
    lines = []
    result = train(cfg, log=lines.append)
    evals = [m for m in read_metrics(tmp_path) if "val_loss" in m]
    assert [m["iter"] for m in evals] == [0, 200]
    assert abs(evals[0]["val_loss"] - math.log(65)) < 0.1  # an untrained model is near uniform over 65 chars
    assert evals[-1]["val_loss"] < 2.9, evals
    assert result["last_losses"]["val"] == evals[-1]["val_loss"]
    # nanoGPT prints the parameter count without position embeddings: 2 layers of 12 C^2 + 2C, wte, ln_f
    C = 64
    n = 65 * C + 2 * (12 * C * C + 2 * C) + C
    assert lines[0].startswith(f"number of parameters: {n / 1e6:.2f}M")


def test_bigram_learns(char_data, tmp_path):
    data_dir, _ = char_data
    cfg = parse(TrainConfig, [str(REPO / "configs" / "bigram_shakespeare_char.py"), f"--data_dir={data_dir}",
                              f"--out_dir={tmp_path}", "--max_iters=400", "--eval_interval=400",
                              "--eval_iters=20", "--dtype=float32"])
    assert (cfg.model, cfg.learning_rate, cfg.block_size, cfg.batch_size) == ("bigram", 1e-2, 8, 32)
    train(cfg, log=quiet)
    evals = [m for m in read_metrics(tmp_path) if "val_loss" in m]
    assert abs(evals[0]["val_loss"] - math.log(65)) < 0.05
    assert evals[-1]["iter"] == 400 and evals[-1]["val_loss"] < 3.0, evals


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    """--dtype=bfloat16: activations in bf16, parameters, gradients and optimizer state in float32."""
    cfg = TrainConfig(learning_rate=1e-3, warmup_iters=0, lr_decay_iters=10)
    tx = make_optimizer(cfg)
    x = jax.random.randint(jax.random.PRNGKey(1), (1, 4, 16), 0, 65)
    y = jnp.roll(x, -1, axis=-1)
    out = {}
    for dtype in ("float32", "bfloat16"):
        config = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dtype=dtype)
        params = init_params(config, jax.random.PRNGKey(0))
        state, loss = train_step(TrainState(params, tx.init(params)), (x, y), jax.random.PRNGKey(2),
                                 model=make_model(config), tx=tx)
        assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
        out[dtype] = float(loss)
    assert out["bfloat16"] == pytest.approx(out["float32"], abs=0.02)  # bf16 keeps ~3 significant digits
    assert out["bfloat16"] != out["float32"]  # and really computed in bf16


def test_dtype_choice():
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_dtype("auto") == ("float32" if on_cpu else "bfloat16")
    if on_cpu:
        with pytest.raises(ConfigError, match="float16 needs a GPU"):
            resolve_dtype("float16")
    else:
        assert resolve_dtype("float16") == "float16"


def test_a_run_is_never_overwritten_by_a_new_one(run_a):
    """Training from scratch into an out_dir that holds checkpoints is refused, and they stay as they were."""
    cfg_a, out_a, _, _ = run_a
    before = as_numpy(load_checkpoint(str(out_a))[1])
    with pytest.raises(CheckpointError, match="--init_from=resume, or train into a new --out_dir"):
        train(dataclasses.replace(cfg_a, learning_rate=1e-2), log=quiet)
    assert_trees_equal(load_checkpoint(str(out_a))[1], before)


def test_resume_under_another_grad_clip(run_a, tmp_path):
    """The optimizer state keeps one structure with and without clipping, so either resumes the other."""
    cfg_a, _, _, _ = run_a
    cfg = dataclasses.replace(cfg_a, out_dir=str(tmp_path), max_iters=10)
    train(cfg, log=quiet)
    result = train(dataclasses.replace(cfg, init_from="resume", max_iters=12, grad_clip=0.0), log=quiet)
    assert result["iter_num"] == 12 and math.isfinite(result["best_val_loss"])


def test_resume_on_a_dataset_with_other_tokens_is_refused(run_a, bpe_data):
    """A character checkpoint fed GPT-2 BPE ids would index past its embedding and train on NaNs."""
    cfg_a, out_a, _, _ = run_a
    bpe_dir, _ = bpe_data
    with pytest.raises(DataError, match="character vocabulary but the dataset is GPT-2 BPE"):
        train(dataclasses.replace(cfg_a, init_from="resume", dataset="shakespeare", data_dir=str(bpe_dir),
                                  max_iters=30), log=quiet)


@pytest.mark.parametrize("kw,message", [
    ({"model": "transformer"}, "--model=transformer: use gpt or bigram"),
    ({"attn_impl": "flash"}, "--attn_impl=flash: use None"),
    ({"attn_impl": "cudnn"}, "--attn_impl=cudnn needs an NVIDIA GPU"),
    ({"num_devices": 3}, "--num_devices=3: need at most"),
])
def test_bad_system_options_are_user_errors(char_data, tmp_path, kw, message):
    data_dir, _ = char_data
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train(tiny_cfg(data_dir, tmp_path, **kw), log=quiet)
