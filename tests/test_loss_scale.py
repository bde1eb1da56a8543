"""float16's dynamic loss scaling against torch.cuda.amp.GradScaler's semantics (nanoGPT's): a float16 run tracks
float32's losses, an overflowing step halves the scale and changes nothing else, the scale grows as GradScaler's
does, a resumed float16 run equals an uninterrupted one bit for bit, and the scaled gradients are reduced alike
on one device, a data-parallel mesh, FSDP and pmap.

`train` refuses --dtype=float16 on a CPU (XLA:CPU has no float16 kernel for jax.nn.dot_product_attention, which
decoding calls); training's attention is written out (kernels.causal_attention's XLA path) and runs there, so the
`float16_on_cpu` fixture lets float16 through."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, quiet, read_metrics, tiny_cfg
from nanogpt_jax import load as load_module
from nanogpt_jax import load_checkpoint
from nanogpt_jax import program as program_module
from nanogpt_jax import step as step_module
from nanogpt_jax.config import TrainConfig
from nanogpt_jax.load import model_config
from nanogpt_jax.model import GPTConfig, init_params, make_model
from nanogpt_jax.optim import OptimConfig, make_optimizer
from nanogpt_jax.step import (INITIAL_SCALE, LossScale, ScaledState, TrainState, initial_loss_scale, next_loss_scale,
                              train_step, with_loss_scale)
from nanogpt_jax.run import Run
from nanogpt_jax.saving import NonFiniteLossError
from nanogpt_jax.train import train


@pytest.fixture
def float16_on_cpu(monkeypatch):
    monkeypatch.setattr(load_module, "resolve_dtype", lambda dtype, platform=None: dtype)


CFG = TrainConfig(learning_rate=3e-3, warmup_iters=0, lr_decay_iters=30, min_lr=3e-4)


def tiny(dtype):
    """A 2-layer GPT, its AdamW (nanoGPT's defaults, clipping at 1), its initial state and jitted step."""
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dtype=dtype)
    tx = make_optimizer(OptimConfig.of(CFG))
    init = with_loss_scale(tx.init) if dtype == "float16" else tx.init
    params = init_params(config, jax.random.PRNGKey(0))
    return TrainState(params, init(params)), partial(train_step, model=make_model(config), tx=tx)


def batch(seed, shape=(2, 4, 16), tokens=None):
    """(x, y) of shape (A, B, T): windows of `tokens` (default: random characters), y the next ones."""
    rng = np.random.default_rng(seed)
    if tokens is None:
        w = rng.integers(0, 65, (*shape[:-1], shape[-1] + 1))
    else:
        starts = rng.integers(0, len(tokens) - shape[-1] - 1, shape[:-1])
        w = tokens[starts[..., None] + np.arange(shape[-1] + 1)]
    return jnp.asarray(w[..., :-1], jnp.int32), jnp.asarray(w[..., 1:], jnp.int32)


def with_scale(state, scale, good_steps=0):
    return state._replace(opt_state=ScaledState(state.opt_state.inner, LossScale(jnp.float32(scale),
                                                                                 jnp.int32(good_steps))))


@pytest.mark.slow
def test_float16_tracks_float32(char_data, float16_on_cpu):
    """30 steps on Tiny Shakespeare: float16's losses stay within 0.005 of float32's (0.0008 seen here; float16
    keeps ~3 significant digits), parameters and AdamW moments stay float32, and the scale never overflows at
    this size."""
    data_dir, _ = char_data
    tokens = np.fromfile(data_dir / "shakespeare_char" / "train.bin", np.uint16)
    batches = [batch(s, tokens=tokens) for s in range(30)]
    losses = {}
    for dtype in ("float32", "float16"):
        state, step = tiny(dtype)
        step = jax.jit(step)
        losses[dtype] = []
        for i in range(30):
            state, loss = step(state, batches[i], jax.random.PRNGKey(i))
            losses[dtype].append(float(loss))
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state.inner)) if x.ndim} == {jnp.dtype("float32")}
    assert state.opt_state.loss_scale == LossScale(INITIAL_SCALE, 30)
    np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=0, atol=0.005)
    assert losses["float16"] != losses["float32"]  # really computed in float16
    assert np.mean(losses["float32"][-5:]) < losses["float32"][0] - 0.4  # and it learned something


@pytest.mark.slow
def test_an_overflow_halves_the_scale_and_skips_exactly_that_step(float16_on_cpu):
    """From a scale large enough for the float16 backward pass to overflow, every step halves it and leaves
    params and optimizer state bit for bit as they were, until the first finite step updates. Then, from twice
    that first finite scale, exactly one step is skipped and the next one updates. --skip_nonfinite_steps counts
    the skipped step and changes nothing else."""
    state0, step = tiny("float16")
    xy = batch(0)
    plain, counting = jax.jit(step), jax.jit(partial(step, skip_nonfinite=True))
    state, scales = with_scale(state0, 2.0**40), []
    for _ in range(40):
        new, loss = plain(state, xy, jax.random.PRNGKey(0))
        assert np.isfinite(float(loss))  # the loss is the unscaled one, whatever the scale
        scales.append(float(state.opt_state.loss_scale.scale))
        if float(new.opt_state.loss_scale.scale) == scales[-1]:
            break  # finite: the update is made
        assert new.opt_state.loss_scale == LossScale(scales[-1] / 2, 0)
        assert_trees_equal((new.params, new.opt_state.inner), (state.params, state.opt_state.inner))
        state = new
    assert 3 < len(scales) < 40 and scales == [2.0**40 / 2**i for i in range(len(scales))]
    first_finite = scales[-1]
    assert new.opt_state.loss_scale == LossScale(first_finite, 1) and int(new.opt_state.inner[1][0].count) == 1
    assert not np.array_equal(new.params["wte"]["embedding"], state0.params["wte"]["embedding"])

    state = with_scale(state0, 2 * first_finite, good_steps=7)
    skipped, (_, flag) = counting(state, xy, jax.random.PRNGKey(0))
    assert int(flag) == 1 and skipped.opt_state.loss_scale == LossScale(first_finite, 0)
    assert_trees_equal((skipped.params, skipped.opt_state.inner), (state.params, state.opt_state.inner))
    updated, (_, flag) = counting(skipped, xy, jax.random.PRNGKey(0))
    assert int(flag) == 0 and updated.opt_state.loss_scale == LossScale(first_finite, 1)
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-6), updated.params, new.params)  # the same update


def torch_scales(found_inf, init_scale, growth_interval):
    """torch's own GradScaler (its CPU build) after each step of a run whose gradients are inf where found_inf
    says: (scale, growth tracker) after each update()."""
    import torch

    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    out = []
    for bad in found_inf:
        scaler.scale(w.sum()).backward()
        w.grad.fill_(float("inf") if bad else 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        out.append((scaler.get_scale(), scaler.state_dict()["_growth_tracker"]))
    return out


@pytest.mark.parametrize("init_scale", [INITIAL_SCALE, 2.0**126])  # 2**127 doubled is inf: it stays 2**127
def test_the_scale_follows_gradscalers_rule(init_scale):
    """Halved and restarted on inf gradients, doubled after growth_interval (3 here; 2000 in a run) finite steps
    in a row, as torch.amp.GradScaler does, step for step."""
    found_inf = [False] * 7 + [True, True] + [False] * 4 + [True] + [False] * 8
    ls, ours = LossScale(jnp.float32(init_scale), jnp.int32(0)), []
    update = jax.jit(partial(next_loss_scale, growth_interval=3))
    for bad in found_inf:
        ls = update(ls, jnp.bool_(not bad))
        ours.append((float(ls.scale), int(ls.good_steps)))
    assert ours == torch_scales(found_inf, init_scale, 3)
    assert (ls.scale.dtype, ls.good_steps.dtype) == (jnp.float32, jnp.int32)
    assert initial_loss_scale() == LossScale(2.0**16, 0) and step_module.GROWTH_INTERVAL == 2000


# --------------------------------------------------------------------------------------------- in a run


def scale_sequence(out_dir):
    """(iteration, loss, lr, loss scale or None) of every step logged."""
    return [(m["iter"], m["loss"], m["lr"], m.get("loss_scale")) for m in read_metrics(out_dir) if "loss" in m]


@pytest.mark.slow
def test_a_resumed_float16_run_equals_an_uninterrupted_one(char_data, tmp_path, monkeypatch, float16_on_cpu):
    """With the scale doubling every 3 finite steps, so that it climbs until the backward pass overflows and
    halves: 10 iterations, then a resume to 20, log the losses, lrs and loss scales of 20 uninterrupted ones and
    end on the same params. A float16 checkpoint resumes in float32 (the scale dropped); a float32 one resumes in
    float16 from a fresh scale."""
    monkeypatch.setattr(step_module, "next_loss_scale", partial(next_loss_scale, growth_interval=3))
    data_dir, _ = char_data
    cfg = tiny_cfg(data_dir, tmp_path / "whole", dtype="float16", dropout=0.1, gradient_accumulation_steps=2)
    lines = []
    train(cfg, log=lines.append)
    whole = scale_sequence(cfg.out_dir)
    scales = [s for *_, s in whole]
    assert scales[:4] == [2.0**16] * 2 + [2.0**17] * 2, scales
    assert any(b == a / 2 for a, b in zip(scales, scales[1:])), scales  # up until it overflows, then down
    assert [line for line in lines if line.startswith("iter 3:")][0].endswith(", loss scale 131072")

    half = dataclasses.replace(cfg, out_dir=str(tmp_path / "half"), max_iters=10)
    train(half, log=quiet)
    shutil.copytree(half.out_dir, tmp_path / "as_float32")
    train(dataclasses.replace(half, init_from="resume", max_iters=20), log=quiet)
    assert scale_sequence(half.out_dir) == whole
    assert_trees_equal(load_checkpoint(half.out_dir)[1], load_checkpoint(cfg.out_dir)[1])

    train(dataclasses.replace(half, out_dir=str(tmp_path / "as_float32"), init_from="resume", max_iters=12,
                              dtype="float32"), log=quiet)
    after = [m for m in read_metrics(tmp_path / "as_float32") if m.get("iter", 0) >= 10 and "loss" in m]
    assert len(after) == 2 and not any("loss_scale" in m for m in after)

    single = dataclasses.replace(cfg, out_dir=str(tmp_path / "from_float32"), max_iters=10, dtype="float32")
    train(single, log=quiet)
    train(dataclasses.replace(single, init_from="resume", max_iters=12, dtype="float16"), log=quiet)
    assert [s for it, *_, s in scale_sequence(single.out_dir)[10:]] == [2.0**16] * 2  # no 3 finite steps yet


@pytest.mark.slow
def test_float16_with_a_nan_loss_stops_unless_skip_nonfinite_steps(char_data, tmp_path, monkeypatch, float16_on_cpu):
    """The scaler handles overflowing gradients; a NaN loss is divergence, not overflow: it stops a float16 run
    as a float32 one, and --skip_nonfinite_steps skips and counts it (with the scaler's own skips)."""
    original = program_module.accumulate_grads

    def nan_at_iteration_3(params, batch, key, loss_scale=None, *, model):
        loss, grads = original(params, batch, key, loss_scale, model=model)
        poison = jnp.where(jnp.sum(batch[0]) == sums[3], jnp.nan, 0.0)
        return loss + poison, jax.tree.map(lambda g: g + poison, grads)

    data_dir, _ = char_data
    cfg = tiny_cfg(data_dir, tmp_path / "stops", dtype="float16", n_layer=1, max_iters=6, eval_interval=6)
    sums = batch_sums(cfg)
    assert sums.count(sums[3]) == 1
    monkeypatch.setattr(program_module, "accumulate_grads", nan_at_iteration_3)
    with pytest.raises(NonFiniteLossError, match="iteration 3: the loss is nan"):
        train(cfg, log=quiet)
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "skips"), skip_nonfinite_steps=True), log=quiet)
    steps = [m for m in read_metrics(tmp_path / "skips") if "loss" in m]
    assert [m["skipped_steps"] for m in steps] == [0, 0, 0, 1, 1, 1]
    assert [m["loss_scale"] for m in steps] == [2.0**16] * 3 + [2.0**15] * 3  # NaN gradients: halved


def batch_sums(cfg):
    """The sum of the input tokens of each iteration's batch, as the run draws them."""
    run = Run(cfg, model_config(cfg, 65))
    return [int(np.asarray(run.train_batch(it)[0]).sum()) for it in range(cfg.max_iters)]


# ------------------------------------------------------------------------------------------ on 8 devices


PROBE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from nanogpt_jax import parallel, program
    from nanogpt_jax.config import TrainConfig
    from nanogpt_jax.model import GPTConfig, init_params

    MARK = 63  # a token only the poisoned step's batch holds, in row 3 of its first micro-batch: device 3's
    original = program.accumulate_grads

    def poisoned(params, batch, key, loss_scale=None, *, model):
        # an inf in one element of this device's own wte gradient, before any reduction: under FSDP the
        # reduce-scatter takes it to the devices holding wte's first rows, not to device 3's shard
        loss, grads = original(params, batch, key, loss_scale, model=model)
        inf = jnp.where(jnp.any(batch[0] == MARK), jnp.inf, 0.0)
        grads["wte"]["embedding"] = grads["wte"]["embedding"].at[0, 0].add(inf)
        return loss, grads

    program.accumulate_grads = poisoned
    options = {"one": dict(num_devices=1), "mesh": {}, "fsdp": dict(fsdp=4), "pmap": dict(parallel="pmap")}
    name, dtype = sys.argv[1], sys.argv[2]
    cfg = TrainConfig(batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-3, warmup_iters=0,
                      lr_decay_iters=10, grad_clip=0.0, **options[name])
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dtype=dtype)
    run = program.Program(cfg, config)
    state = run.init_state(init_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    out = {"layout": run.layout.describe(), "losses": [], "scales": []}
    for it in range(3):
        w = rng.integers(0, MARK, (2, 8, 17)).astype(np.int32)
        if it == 1:
            w[0, 3, 5] = MARK
        xy = (w[..., :-1], w[..., 1:])
        if run.layout.pmap:  # device i takes rows i*R:(i+1)*R of every micro-batch
            xy = tuple(a.reshape(2, 8, 1, 16).transpose(1, 0, 2, 3) for a in xy)
        state, loss = run.step(state, xy, parallel.put_replicated(run.mesh, jax.random.PRNGKey(it)))
        out["losses"].append(float(loss))
        scale = run.loss_scale(state)
        out["scales"].append(None if scale is None else float(scale))
        if it == 0:  # AdamW's first moment after one step: 0.1 x the true (unscaled, reduced) gradient
            mu = run.saved_state(state).opt_state
            mu = (mu.inner if dtype == "float16" else mu)[1][0].mu
            out["grads"] = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(mu)]
    out["params"] = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(run.saved_state(state).params)]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_scaled_gradients_are_reduced_alike_on_every_layout(tmp_path):
    """Three float16 steps on 1 device, a data-parallel mesh over 8, FSDP over 4 (mesh 2 x 4) and pmap over 8;
    in the second, device 3 alone gets an inf in one gradient element before the reduction. Every layout skips
    that step and only that one (the finite check sees every shard: under FSDP the inf lands in another device's
    shard), halves the scale alike, and takes the same unscaled gradients (as float32's) and parameters."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = {}
    for name, dtype in [("one", "float32"), ("one", "float16"), ("mesh", "float16"), ("fsdp", "float16"),
                        ("pmap", "float16")]:  # one after the other: two cores
        proc = subprocess.run([sys.executable, str(script), name, dtype], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name, dtype] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "mesh data=2 x fsdp=4" in out["fsdp", "float16"]["layout"]
    ref = out["one", "float16"]
    assert ref["scales"] == [2.0**16, 2.0**15, 2.0**15] and out["one", "float32"]["scales"] == [None] * 3
    for name in ("mesh", "fsdp", "pmap"):
        got = out[name, "float16"]
        assert got["scales"] == ref["scales"], name
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, err_msg=name)
        assert_close_to_max(got["grads"], ref["grads"], name)
        # finite (the inf step was skipped), within two AdamW steps of lr 1e-3: a gradient element near zero may
        # come out with the other sign after float16's rounding, and AdamW's first step is lr x its sign
        for a, b in zip(got["params"], ref["params"]):
            assert np.isfinite(a).all(), name
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-3, err_msg=name)
    assert_close_to_max(ref["grads"], out["one", "float32"]["grads"], "float32")  # unscaled: float32's gradients


def assert_close_to_max(leaves, ref_leaves, name):
    """Each leaf within 1% of the reference leaf's largest element (0.4% seen here: float16's rounding on other
    row splits); a scale left in (65536) or applied twice would be far off."""
    for a, b in zip(leaves, ref_leaves):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * np.abs(b).max(), err_msg=name)
