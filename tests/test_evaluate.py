"""`nanogpt-jax eval` against independent references: transformers' GPT2LMHeadModel (randomly initialised here,
nothing is downloaded) and numpy recomputes of the mean cross-entropy over the same windows."""

import math
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import HF_POSITIONS, REPO, assert_one_error_line, np_log_softmax, quiet, read_metrics
from nanogpt_jax.config import EvalConfig, TrainConfig, parse
from nanogpt_jax.data import DataError
from nanogpt_jax.evaluate import run
from nanogpt_jax.load import load_run
from nanogpt_jax.model import make_model
from nanogpt_jax.train import train


def torch_nll(model, windows):
    """(sum of token NLLs, count) of each window predicting its own next tokens, one forward per window."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            w = torch.from_numpy(np.asarray(w, np.int64))[None]
            logits = model(w[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits[0].double(), w[0, 1:], reduction="sum").item()
            count += w.shape[1] - 1
    return total, count


def numpy_nll(config, params, windows):
    """The same with this project's model giving the logits and numpy doing the cross-entropy."""
    model = make_model(config)
    total, count = 0.0, 0
    for w in windows:
        w = np.asarray(w)
        logp = np_log_softmax(model.apply({"params": params}, jnp.asarray(w[None, :-1]))[0][0])
        total -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return total, count


def full_windows(tokens, T):
    return [tokens[s:s + T + 1] for s in range(0, len(tokens) - 1, T)]


# ------------------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("block_size", [None, 16])
def test_full_pass_equals_torch(hf_small, token_data, block_size):
    """--eval_iters=0: every val token predicted once, the loss transformers gives on the same windows."""
    model, folder = hf_small
    data_dir, val = token_data
    r = run(EvalConfig(init_from=str(folder), dataset="toks", data_dir=str(data_dir), eval_iters=0, batch_size=4,
                       block_size=block_size, dtype="float32"), progress=False)
    T = block_size or HF_POSITIONS
    total, count = torch_nll(model, full_windows(val, T))  # a cropped model sees positions 0..T-1, as HF does
    assert count == len(val) - 1 == r.tokens and r.batches == math.ceil(math.ceil(999 / T) / 4)
    np.testing.assert_allclose(r.loss, total / count, rtol=1e-5)
    np.testing.assert_allclose(r.perplexity, math.exp(total / count), rtol=1e-5)


@pytest.mark.slow
def test_random_batches_equal_torch_and_train_estimate(hf_small, token_data, tmp_path):
    """--eval_iters=N: nanoGPT's estimate over train's iteration-0 windows, as transformers and train compute it."""
    model, folder = hf_small
    data_dir, val = token_data
    seed, B, iters = 7, 4, 3
    r = run(EvalConfig(init_from=str(folder), dataset="toks", data_dir=str(data_dir), eval_iters=iters,
                       batch_size=B, seed=seed, dtype="float32"), progress=False)
    # nanoGPT's estimate: the mean over eval_iters batches of the batch mean; windows as train picks them
    # at iteration 0: numpy's generator seeded with (seed, split=1 for val, process 0, iteration 0, k).
    means = []
    for k in range(iters):
        ix = np.random.default_rng([seed, 1, 0, 0, k]).integers(0, len(val) - HF_POSITIONS, size=B)
        total, count = torch_nll(model, [val[i:i + HF_POSITIONS + 1] for i in ix])
        means.append(total / count)
    assert (r.tokens, r.batches) == (iters * B * HF_POSITIONS, iters)
    np.testing.assert_allclose(r.loss, np.mean(means), rtol=1e-5)

    # `train` with eval_only (nanoGPT's eval configs) reports the same val loss.
    train(TrainConfig(init_from=str(folder), dataset="toks", data_dir=str(data_dir), out_dir=str(tmp_path),
                      eval_only=True, eval_iters=iters, batch_size=B, block_size=64, seed=seed, dtype="float32"),
          log=quiet)
    [metrics] = read_metrics(tmp_path)
    np.testing.assert_allclose(metrics["val_loss"], r.loss, rtol=1e-6)


@pytest.mark.slow
def test_checkpoint_on_its_dataset_and_on_a_text_file(char_run, input_text, tmp_path):
    """A checkpoint on its run's dataset by default, and on a text file (numpy's loss); bad text is refused."""
    out, data_dir = char_run
    config, params, record = load_run(str(out))
    stoi = {c: i for i, c in enumerate(record.meta["itos"])}

    # the run's own dataset and data_dir by default; every val token once
    r = run(EvalConfig(out_dir=str(out), eval_iters=0, batch_size=64, dtype="float32"), progress=False)
    assert "shakespeare_char val" in r.source and r.tokens == 111_540 - 1
    assert 2.0 < r.loss < math.log(65)  # 10 iterations learn something

    text = input_text[:500]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    r = run(EvalConfig(out_dir=str(out), input=str(tmp_path / "t.txt"), eval_iters=0, batch_size=3,
                       dtype="float32"), progress=False)
    total, count = numpy_nll(config, params, full_windows([stoi[c] for c in text], 32))
    assert (r.tokens, r.batches) == (499, 6)  # 16 windows, 3 per batch
    np.testing.assert_allclose(r.loss, total / count, rtol=1e-5)

    (tmp_path / "bad.txt").write_text("ROMEO: €", encoding="utf-8")
    with pytest.raises(DataError, match="'€' is not in this dataset's vocabulary"):
        run(EvalConfig(out_dir=str(out), input=str(tmp_path / "bad.txt"), eval_iters=0), progress=False)
    (tmp_path / "short.txt").write_text("ROMEO: hi", encoding="utf-8")  # 9 tokens: no random window of 32
    with pytest.raises(DataError, match="fewer than block_size \\+ 1 = 33.*--eval_iters=0"):
        run(EvalConfig(out_dir=str(out), input=str(tmp_path / "short.txt"), eval_iters=2), progress=False)


# ---------------------------------------------------------------------------------------------- command line


@pytest.mark.slow
def test_eval_command_line(hf_small, token_data, tmp_path):
    """As a user runs it: one result line on stdout, a progress bar on stderr."""
    _, folder = hf_small
    data_dir, _ = token_data
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "eval", f"--init_from={folder}", "--dataset=toks",
                           f"--data_dir={data_dir}", "--eval_iters=0", "--batch_size=4", "--dtype=float32"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    assert "toks val: loss" in line and "perplexity" in line and "(999 tokens, 4 batches)" in line
    assert "4/4" in proc.stderr  # tqdm

    proc = subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "eval", "--init_from=nowhere/model"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: 'nowhere/model' is neither a local folder")


@pytest.mark.parametrize("args, fragments", [
    (["eval", "--split=test"], ["--split=test", "val"]),
    (["eval", "--eval_iters=-1"], ["--eval_iters"]),
    (["eval", "--out_dir=never_trained"], ["never_trained"]),
    (["eval", "--init_from=HF", "--dataset=missing"], ["missing", "nanogpt-jax prepare"]),
    (["eval", "--init_from=HF", "--block_size=65"], ["--block_size=65", "64 positions"]),
    (["eval", "--init_from=HF", "--input=nothing.txt"], ["--input=nothing.txt", "cannot read"]),
    (["eval", "--init_from=HF", "--dataset=shakespeare_char", "--data_dir=CHAR"], ["GPT-2 BPE", "meta.json"]),
    (["eval", "--init_from=HF", "--dataset=big", "--data_dir=BIG"], ["token id 600", "vocab_size 512"]),
    (["eval", "--init_fro=gpt2"], ["--init_fro", "did you mean --init_from"]),
])
def test_eval_errors_are_one_line(args, fragments, hf_small, char_data, tmp_path, monkeypatch, run_cli):
    """Each wrong eval command line ends with one `error:` line naming the option or file at fault."""
    _, folder = hf_small
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BIG" / "big").mkdir(parents=True)
    np.array([1, 2, 600, 3] * 100, np.uint16).tofile(tmp_path / "BIG" / "big" / "val.bin")
    args = [a.replace("HF", str(folder)).replace("CHAR", str(char_data[0])) for a in args]
    code, out, err = run_cli(*args)
    assert_one_error_line(code, out, err, *fragments)


# nanoGPT's README: the released models' OpenWebText val losses, and their sizes (GPT-2 paper)
PUBLISHED = {"gpt2": ("3.12", 124, 12, 12, 768), "gpt2-medium": ("2.84", 350, 24, 16, 1024),
             "gpt2-large": ("2.67", 774, 36, 20, 1280), "gpt2-xl": ("2.54", 1558, 48, 25, 1600)}


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_eval_configs_name_their_own_model_and_loss(model):
    """configs/eval_<model>.py evaluates <model> (nanoGPT's eval settings, for eval and for train), says it
    in its first line with that model's size, and pairs <model> with its own published loss."""
    loss, millions, n_layer, n_head, n_embd = PUBLISHED[model]
    path = REPO / "configs" / f"eval_{model.replace('-', '_')}.py"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"# nanoGPT's config/{path.name}: evaluate the released {model} on OpenWebText."
    assert lines[1] == f"# {millions}M parameters; n_layer={n_layer}, n_head={n_head}, n_embd={n_embd}."
    [published] = [line for line in lines if "published OpenWebText val losses" in line]
    pairs = dict(re.findall(r"(gpt2(?:-medium|-large|-xl)?) (\d\.\d\d)", published))
    assert pairs == {name: p[0] for name, p in PUBLISHED.items()}  # all four, each with its own loss
    for cls in (EvalConfig, TrainConfig):  # nanogpt-jax eval CONFIG.py and nanogpt-jax train CONFIG.py
        cfg = parse(cls, [str(path)])
        assert (cfg.batch_size, cfg.eval_iters, cfg.eval_only, cfg.init_from, cfg.dataset) == (
            8, 500, True, model, "openwebtext")
        assert pairs[cfg.init_from] == loss
