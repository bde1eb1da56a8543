"""The training loop against nanoGPT's: a resumed run equals an uninterrupted one bit for bit, the loss falls on
Tiny Shakespeare (GPT and the lecture's bigram), micro-batches and finetuning from a HuggingFace folder train as
they should, the step compiles once, and bad runs are refused before they start."""

import dataclasses
import gzip
import json
import math

import jax
import numpy as np
import pytest

from conftest import (HF_POSITIONS, HF_VOCAB, REPO, as_numpy, assert_trees_equal, hf_gpt2, nanogpt_get_lr, quiet,
                      read_metrics, tiny_cfg)
from nanogpt_jax import load_checkpoint
from nanogpt_jax.checkpoint import Checkpointer, CheckpointError
from nanogpt_jax.config import ConfigError, EvalConfig, TrainConfig, parse
from nanogpt_jax.data import DataError, gpt2_encoding
from nanogpt_jax.evaluate import run as run_eval
from nanogpt_jax.load import load_run, model_config
from nanogpt_jax.model import init_params, unstack_layers
from nanogpt_jax.run import Run
from nanogpt_jax.train import train

GPT2_VOCAB = 50257


# ----------------------------------------------------------------------------------------------------------
# the step inside the loop: micro-batches, no recompilation


@pytest.mark.slow
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


@pytest.mark.slow
def test_jitted_step_compiles_once(char_data, tmp_path):
    """Iterations after the first, and a second evaluation, compile nothing; the first loss is about ln(65)."""
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
# resuming


@pytest.mark.slow
def test_resume_equals_uninterrupted(run_a, tmp_path):
    """10 iterations, then a resume to 20, log the losses, lrs, evaluations and params of 20 uninterrupted ones."""
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


@pytest.mark.slow
def test_a_checkpoint_of_per_layer_params_resumes(run_a, tmp_path):
    """A checkpoint written before the blocks were stacked (record version 2: params and AdamW moments under
    h_0, h_1, remat a bool, no scan_layers) resumes to the same 20th iteration as the uninterrupted run."""
    cfg_a, out_a, _, _ = run_a
    new, old = tmp_path / "new", tmp_path / "old"
    train(dataclasses.replace(cfg_a, out_dir=str(new), max_iters=10), log=quiet)
    run = Run(dataclasses.replace(cfg_a, out_dir=str(new)), load_run(str(new))[0])
    reader = Checkpointer(str(new), create=False)
    state, rng = run.restore_state(reader)
    record = reader.record("latest")
    reader.close()
    model = {k: v for k, v in record.model.items() if k != "scan_layers"} | {"remat": False}
    writer = Checkpointer(str(old))
    writer.save("latest", 10, unstack_layers(state.params), unstack_layers(state.opt_state), rng,
                dataclasses.replace(record, model=model, version=2))
    writer.close()
    assert (old / "checkpoints" / "latest" / "10" / "params").is_dir()
    assert load_run(str(old))[2].version == 2
    train(dataclasses.replace(cfg_a, out_dir=str(old), init_from="resume", max_iters=20), log=quiet)
    assert_trees_equal(load_checkpoint(str(old))[1], load_checkpoint(str(out_a))[1])


@pytest.mark.slow
def test_resume_under_another_grad_clip(run_a, tmp_path):
    """The optimizer state keeps one structure with and without clipping, so either resumes the other."""
    cfg_a, _, _, _ = run_a
    cfg = dataclasses.replace(cfg_a, out_dir=str(tmp_path), max_iters=10)
    train(cfg, log=quiet)
    result = train(dataclasses.replace(cfg, init_from="resume", max_iters=12, grad_clip=0.0), log=quiet)
    assert result["iter_num"] == 12 and math.isfinite(result["best_val_loss"])


# ----------------------------------------------------------------------------------------------------------
# the loss falls


@pytest.mark.slow
def test_gpt_loss_falls_on_shakespeare_char(char_data, tmp_path):
    """200 iterations of a small GPT take val loss from ln(65) to below 2.9; the parameter count is nanoGPT's."""
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
    """The lecture's bigram config: val loss from ln(65) to below 3.0 in 400 iterations."""
    data_dir, _ = char_data
    cfg = parse(TrainConfig, [str(REPO / "configs" / "bigram_shakespeare_char.py"), f"--data_dir={data_dir}",
                              f"--out_dir={tmp_path}", "--max_iters=400", "--eval_interval=400",
                              "--eval_iters=20", "--dtype=float32"])
    assert (cfg.model, cfg.learning_rate, cfg.block_size, cfg.batch_size) == ("bigram", 1e-2, 8, 32)
    train(cfg, log=quiet)
    evals = [m for m in read_metrics(tmp_path) if "val_loss" in m]
    assert abs(evals[0]["val_loss"] - math.log(65)) < 0.05
    assert evals[-1]["iter"] == 400 and evals[-1]["val_loss"] < 3.0, evals

# ----------------------------------------------------------------------------------------------------------
# finetuning from released (here: randomly initialised HuggingFace) weights


@pytest.mark.slow
def test_finetune_from_hf_folder_crops_block_size_and_sets_dropout(bpe_data, tmp_path, run_cli):
    """nanoGPT's finetune_shakespeare recipe in miniature: GPT-2 BPE Shakespeare, a tiny full-vocab GPT-2."""
    data_dir, _ = bpe_data
    folder = tmp_path / "hf_bpe"
    hf_gpt2(32, 2, vocab=GPT2_VOCAB, initializer_range=0.1).save_pretrained(folder)
    out = tmp_path / "ft"
    result = train(TrainConfig(init_from=str(folder), dataset="shakespeare", data_dir=str(data_dir),
                               out_dir=str(out), block_size=32, dropout=0.1, batch_size=8,
                               gradient_accumulation_steps=1, eval_iters=4, eval_interval=20, max_iters=40,
                               learning_rate=3e-3, decay_lr=False, always_save_checkpoint=False, dtype="float32"),
                   log=quiet)
    config, _, record = load_run(str(out))
    assert (config.block_size, config.dropout, config.vocab_size, config.n_embd) == (32, 0.1, GPT2_VOCAB, 32)
    assert record.meta is None and record.train["init_from"] == str(folder)
    metrics = read_metrics(out)
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert val[-1] < val[0] - 1.0 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, (val, losses)
    assert result["iter_num"] == 40

    # GPT-2 BPE text in and out: eval of a text file, then sample
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 5
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    r = run_eval(EvalConfig(out_dir=str(out), input=str(tmp_path / "t.txt"), eval_iters=0, batch_size=2,
                            dtype="float32"), progress=False)
    assert r.tokens == len(gpt2_encoding().encode(text)) - 1 and r.loss < val[0]
    code, stdout, err = run_cli("sample", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1",
                                "--max_new_tokens=5", "--seed=3")
    assert code == 0 and stdout.startswith("ROMEO:"), err


@pytest.mark.slow
def test_finetune_refuses_a_longer_block_size_and_a_smaller_vocabulary(hf_small, bpe_data, tmp_path):
    """A pretrained model can be cropped, not grown; a dataset with ids past its vocabulary is refused."""
    data_dir, _ = bpe_data
    _, folder = hf_small  # HF_VOCAB = 512 ids: GPT-2 BPE Shakespeare holds ids up to 50256
    cfg = TrainConfig(init_from=str(folder), dataset="shakespeare", data_dir=str(data_dir),
                      out_dir=str(tmp_path / "ft"), block_size=HF_POSITIONS + 1, dtype="float32")
    with pytest.raises(ConfigError, match=f"has only {HF_POSITIONS} positions; it can be cropped, not grown"):
        train(cfg, log=quiet)
    with pytest.raises(DataError, match=f"and the model has {HF_VOCAB} ids"):
        train(dataclasses.replace(cfg, block_size=HF_POSITIONS), log=quiet)


def test_finetune_config_is_nanogpts():
    """configs/finetune_shakespeare.py holds nanoGPT's config/finetune_shakespeare.py values."""
    cfg = parse(TrainConfig, [str(REPO / "configs" / "finetune_shakespeare.py")])
    assert (cfg.out_dir, cfg.eval_interval, cfg.eval_iters, cfg.dataset, cfg.init_from, cfg.always_save_checkpoint,
            cfg.batch_size, cfg.gradient_accumulation_steps, cfg.max_iters, cfg.learning_rate, cfg.decay_lr) == (
        "out-shakespeare", 5, 40, "shakespeare", "gpt2-xl", False, 1, 32, 20, 3e-5, False)


# ----------------------------------------------------------------------------------------------------------
# refusals: nothing starts that would overwrite a run or train on garbage


def test_resume_without_checkpoint_is_a_user_error(char_data, tmp_path):
    """Resuming or loading where nothing was trained says so, and creates no folder."""
    data_dir, _ = char_data
    with pytest.raises(CheckpointError, match="no latest checkpoint"):
        train(tiny_cfg(data_dir, tmp_path, init_from="resume"), log=quiet)
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        load_checkpoint(str(tmp_path / "never_trained"))
    assert not (tmp_path / "never_trained").exists()


@pytest.mark.slow
def test_a_run_is_never_overwritten_by_a_new_one(run_a):
    """Training from scratch into an out_dir that holds checkpoints is refused, and they stay as they were."""
    cfg_a, out_a, _, _ = run_a
    before = as_numpy(load_checkpoint(str(out_a))[1])
    with pytest.raises(CheckpointError, match="--init_from=resume, or train into a new --out_dir"):
        train(dataclasses.replace(cfg_a, learning_rate=1e-2), log=quiet)
    assert_trees_equal(load_checkpoint(str(out_a))[1], before)


@pytest.mark.slow
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
    """A bad model, attention kernel or device count is a ConfigError saying what to use."""
    data_dir, _ = char_data
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train(tiny_cfg(data_dir, tmp_path, **kw), log=quiet)


# ----------------------------------------------------------------------------------------------------------
# stopping: SIGTERM saves and a resume continues bit for bit


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_bit_for_bit(char_data, tmp_path):
    """A CLI run stopped by SIGTERM after iteration 3 saves `latest` at its next iteration k, prints how to
    resume and exits 0; resuming to k + 4 logs the losses, evaluations and params of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data_dir, _ = char_data
    out = tmp_path / "stopped"
    cfg = tiny_cfg(data_dir, out, n_layer=1, eval_interval=5, max_iters=100_000, lr_decay_iters=50,
                   dropout=0.1)
    args = [f"--{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(TrainConfig(), f.name)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_jax.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and any(m.get("iter", -1) >= 3 for m in read_metrics_tolerant(metrics)):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    last = stdout.splitlines()[-1]
    assert last.startswith("SIGTERM: saved iteration ") and "--init_from=resume" in last, stdout
    k = int(last.split()[3])
    assert k >= 4 and load_run(str(out))[2].iter_num == k
    # resume in this process (one CPU device, as the subprocess) and run the same iterations uninterrupted
    train(dataclasses.replace(cfg, init_from="resume", max_iters=k + 4), log=quiet)
    whole = dataclasses.replace(cfg, out_dir=str(tmp_path / "whole"), max_iters=k + 4)
    train(whole, log=quiet)
    a, b = read_metrics(whole.out_dir), read_metrics(out)
    assert [m["iter"] for m in b] == [m["iter"] for m in a]  # the same records, none twice
    for ma, mb in zip(a, b):
        assert {key: ma.get(key) for key in ("loss", "lr", "train_loss", "val_loss")} == \
               {key: mb.get(key) for key in ("loss", "lr", "train_loss", "val_loss")}, (ma, mb)
    assert_trees_equal(load_checkpoint(str(out))[1], load_checkpoint(whole.out_dir)[1])


def read_metrics_tolerant(path):
    """metrics.jsonl while it is written: complete lines only."""
    import json

    *lines, _ = path.read_text().split("\n")
    return [json.loads(line) for line in lines]


# ----------------------------------------------------------------------------------------------------------
# non-finite losses


def _poison_some_batches(monkeypatch):
    """Training steps whose batch's token sum is a multiple of 3 (about a third, fixed per iteration) get a NaN
    loss and NaN gradients; evaluation is left alone."""
    import jax.numpy as jnp

    from nanogpt_jax import program as program_module

    original = program_module.accumulate_grads

    def accumulate_grads(params, batch, key, loss_scale=None, *, model):
        loss, grads = original(params, batch, key, loss_scale, model=model)
        poison = jnp.where(jnp.sum(batch[0]) % 3 == 0, jnp.nan, 0.0)
        return loss + poison, jax.tree.map(lambda g: g + poison, grads)

    monkeypatch.setattr(program_module, "accumulate_grads", accumulate_grads)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(char_data, tmp_path, monkeypatch):
    from nanogpt_jax.saving import NonFiniteLossError

    data_dir, _ = char_data
    _poison_some_batches(monkeypatch)
    cfg = tiny_cfg(data_dir, tmp_path, n_layer=1, eval_interval=1, max_iters=20)
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, log=quiet)
    bad = [m["iter"] for m in read_metrics(tmp_path) if "loss" in m and not math.isfinite(m["loss"])]
    assert len(bad) == 1 and f"iteration {bad[0]}: the loss is nan" in str(e.value)
    assert f"last good checkpoint in {tmp_path} (iteration {bad[0]}) is kept" in str(e.value)
    assert "\n" not in str(e.value)
    # evaluated and saved every iteration up to the bad one, and nothing after it
    assert load_run(str(tmp_path))[2].iter_num == bad[0]  # the state before the bad step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(load_checkpoint(str(tmp_path))[1]))


@pytest.mark.slow
def test_nan_loss_before_any_checkpoint_says_none_was_saved(char_data, tmp_path, monkeypatch):
    """NaN from the first step: no checkpoint to keep, and the message does not claim one."""
    import jax.numpy as jnp

    from nanogpt_jax import program as program_module
    from nanogpt_jax.saving import NonFiniteLossError

    data_dir, _ = char_data
    original = program_module.accumulate_grads
    monkeypatch.setattr(program_module, "accumulate_grads", lambda params, batch, key, loss_scale=None, *, model:
                        jax.tree.map(lambda x: x * jnp.nan, original(params, batch, key, loss_scale, model=model)))
    with pytest.raises(NonFiniteLossError) as e:
        train(tiny_cfg(data_dir, tmp_path, n_layer=1, eval_interval=5, max_iters=10), log=quiet)
    assert str(e.value).startswith("iteration 0: the loss is nan; stopped, and no checkpoint had been saved. ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no empty checkpoint folders


@pytest.mark.slow
def test_skip_nonfinite_steps_keeps_the_state_and_counts(char_data, tmp_path, monkeypatch):
    data_dir, _ = char_data
    _poison_some_batches(monkeypatch)
    cfg = tiny_cfg(data_dir, tmp_path, n_layer=1, eval_interval=20, max_iters=20, skip_nonfinite_steps=True)
    lines = []
    train(cfg, log=lines.append)
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    n_bad = sum(not math.isfinite(m["loss"]) for m in steps)
    assert 0 < n_bad < 20 and steps[-1]["skipped_steps"] == n_bad
    assert [m["skipped_steps"] for m in steps] == list(np.cumsum([not math.isfinite(m["loss"]) for m in steps]))
    assert [line for line in lines if line.startswith("iter 19:")][0].endswith(f", skipped {n_bad} non-finite steps")
    params = load_checkpoint(str(tmp_path))[1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_out_dir_that_is_a_file_is_refused(char_data, tmp_path):
    data_dir, _ = char_data
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ConfigError, match=f"--out_dir={tmp_path / 'out'} is a file"):
        train(tiny_cfg(data_dir, tmp_path / "out"), log=quiet)


@pytest.mark.slow
def test_a_second_training_in_one_out_dir_is_refused_and_a_stale_lock_taken_over(char_data, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from nanogpt_jax.control import RunLockedError

    data_dir, _ = char_data
    cfg = tiny_cfg(data_dir, tmp_path, n_layer=1, max_iters=2, eval_interval=2)
    lock = tmp_path / ".lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{other.pid} {socket.gethostname()}\n")
        with pytest.raises(RunLockedError, match=f"in use by training process {other.pid}"):
            train(cfg, log=quiet)
        assert lock.read_text() == f"{other.pid} {socket.gethostname()}\n"  # the holder's lock stays
    finally:
        other.kill()
        other.wait()
    # the holder is gone: its lock is stale, taken over and removed at the end
    assert train(cfg, log=quiet)["iter_num"] == 2 and not lock.exists()
    seen = []
    train(dataclasses.replace(cfg, init_from="resume", max_iters=3),
          log=lambda line: seen.append(lock.read_text()))
    assert seen[0] == f"{os.getpid()} {socket.gethostname()}\n" and not lock.exists()


@pytest.mark.parametrize("args,fragment", [
    (["--n_layer=3"], "--n_layer=3 but the checkpoint in {out} has n_layer=2"),
    (["--n_layer=12"], "--n_layer=12 but the checkpoint in {out} has n_layer=2"),  # set, though the default
    (["--block_size=64"], "--block_size=64 but the checkpoint in {out} has block_size=32"),
    (["--bias=True"], "--bias=True but the checkpoint in {out} has bias=False"),
    (["--model=bigram"], "--model='bigram' but the checkpoint in {out} has model='gpt'"),
])
def test_resume_with_another_architecture_is_one_line(char_run, run_cli, args, fragment):
    out, data_dir = char_run
    from conftest import assert_one_error_line

    result = run_cli("train", "--init_from=resume", f"--out_dir={out}", "--dataset=shakespeare_char",
                     f"--data_dir={data_dir}", "--n_head=2", "--n_embd=32", *args)
    assert_one_error_line(*result, fragment.format(out=out), "drop the option")


@pytest.mark.slow
def test_sigint_in_process_saves_and_restores_the_handler(char_data, tmp_path):
    """Ctrl-C (SIGINT) at iteration 2 ends the step, saves `latest` at 3 and returns stopped_by='SIGINT'; the
    command line then exits 130. The previous handler is back afterwards."""
    import os
    import signal

    data_dir, _ = char_data
    before = signal.getsignal(signal.SIGINT)
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("iter 2:"):
            os.kill(os.getpid(), signal.SIGINT)

    result = train(tiny_cfg(data_dir, tmp_path, n_layer=1, max_iters=50, eval_interval=50), log=log)
    assert result["stopped_by"] == "SIGINT" and result["iter_num"] == 3
    assert lines[-1] == f"SIGINT: saved iteration 3 to {tmp_path}; continue with the same options and --init_from=resume"
    assert load_run(str(tmp_path))[2].iter_num == 3 and signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_eval_only_evaluates_and_stops_on_resume_too(char_data, tmp_path):
    """nanoGPT trains on when eval_only meets a resume; here eval_only always means evaluate once and stop."""
    data_dir, _ = char_data
    cfg = tiny_cfg(data_dir, tmp_path, max_iters=2, eval_interval=2)
    train(cfg, log=quiet)
    before = load_checkpoint(str(tmp_path))[1]
    result = train(dataclasses.replace(cfg, init_from="resume", max_iters=10, eval_only=True), log=quiet)
    assert result["iter_num"] == 2 and set(result["last_losses"]) == {"train", "val"}
    assert_trees_equal(load_checkpoint(str(tmp_path))[1], before)
    assert max(m["iter"] for m in read_metrics(tmp_path)) == 2


@pytest.mark.slow
def test_profile_traces_the_iterations_asked_for(char_data, tmp_path):
    """--profile=1:3 writes a jax.profiler trace (TensorBoard's xplane.pb and Perfetto's JSON) holding the
    train step's executions, each step annotated with its iteration: 1 and 2, no other."""
    data_dir, _ = char_data
    lines = []
    train(tiny_cfg(data_dir, tmp_path, max_iters=5, eval_interval=5, profile="1:3"), log=lines.append)
    (trace,) = (tmp_path / "profile").glob("plugins/profile/*/perfetto_trace.json.gz")
    assert list(trace.parent.glob("*.xplane.pb"))
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train") == [1, 2]
    assert any("jit(train_step)" in e.get("name", "") for e in events)  # the step ran inside the trace
    assert any(line.startswith("profile of iterations 1..2 written to ") for line in lines)
