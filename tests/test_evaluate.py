"""`nanogpt-jax eval` and `convert`, and finetuning from a HuggingFace folder, against independent references:
transformers' GPT2LMHeadModel (randomly initialised here, nothing is downloaded) and numpy recomputes of the
mean cross-entropy over the same windows."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax import cli, parallel
from nanogpt_jax.checkpoint import CheckpointError
from nanogpt_jax.load import load_run
from nanogpt_jax.config import ConfigError, EvalConfig, TrainConfig, UserError, parse
from nanogpt_jax.convert import ConvertError, import_hf
from nanogpt_jax.data import DataError, gpt2_encoding
from nanogpt_jax.evaluate import run
from nanogpt_jax.model import make_model
from nanogpt_jax.pretrained import from_pretrained
from nanogpt_jax.train import train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, N_POS = 512, 64
GPT2_VOCAB = 50257


def quiet(*_):
    pass


def hf_model(vocab=VOCAB, n_embd=64, n_head=4, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=N_POS, n_embd=n_embd, n_layer=2, n_head=n_head,
                                  initializer_range=0.1, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF inits LayerNorms to (1, 0) and biases to 0: perturb them
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model


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
        logits = np.asarray(model.apply({"params": params}, jnp.asarray(w[None, :-1]))[0][0], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return total, count


def full_windows(tokens, T):
    return [tokens[s:s + T + 1] for s in range(0, len(tokens) - 1, T)]


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory):
    """A vocab-512 GPT2LMHeadModel and its save_pretrained folder."""
    model = hf_model()
    folder = tmp_path_factory.mktemp("hf_small")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """A dataset `toks` of random ids below 512 (no meta.json: read as GPT-2 BPE ids); val is not a multiple
    of the block size, so the full pass ends with a short window."""
    data_dir = tmp_path_factory.mktemp("data_toks")
    (data_dir / "toks").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("val", 1000)):
        rng.integers(0, VOCAB, n).astype(np.uint16).tofile(data_dir / "toks" / f"{split}.bin")
    return data_dir, np.fromfile(data_dir / "toks" / "val.bin", np.uint16).astype(np.int64)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, char_data):
    """A bias=False character model trained 10 iterations on shakespeare_char (checkpoint at 10)."""
    data_dir, _ = char_data
    out = tmp_path_factory.mktemp("char_run")
    cfg = TrainConfig(dataset="shakespeare_char", data_dir=str(data_dir), out_dir=str(out), n_layer=2, n_head=2,
                      n_embd=32, block_size=32, batch_size=8, gradient_accumulation_steps=1, eval_iters=2,
                      eval_interval=10, max_iters=10, learning_rate=3e-3, decay_lr=False, dtype="float32")
    train(cfg, log=quiet)
    return out, data_dir


def in_process_cli(monkeypatch, capsys, *args):
    """cli.main in this process (JAX is already started here: its CPU device count cannot change)."""
    monkeypatch.setattr(parallel, "use_all_cpu_cores", lambda: None)
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("block_size", [None, 16])
def test_full_pass_equals_torch(hf_small, token_data, block_size):
    model, folder = hf_small
    data_dir, val = token_data
    r = run(EvalConfig(init_from=str(folder), dataset="toks", data_dir=str(data_dir), eval_iters=0, batch_size=4,
                       block_size=block_size, dtype="float32"), progress=False)
    T = block_size or N_POS
    total, count = torch_nll(model, full_windows(val, T))  # a cropped model sees positions 0..T-1, as HF does
    assert count == len(val) - 1 == r.tokens and r.batches == math.ceil(math.ceil(999 / T) / 4)
    np.testing.assert_allclose(r.loss, total / count, rtol=1e-5)
    np.testing.assert_allclose(r.perplexity, math.exp(total / count), rtol=1e-5)


def test_random_batches_equal_torch_and_train_estimate(hf_small, token_data, tmp_path):
    model, folder = hf_small
    data_dir, val = token_data
    seed, B, iters = 7, 4, 3
    r = run(EvalConfig(init_from=str(folder), dataset="toks", data_dir=str(data_dir), eval_iters=iters,
                       batch_size=B, seed=seed, dtype="float32"), progress=False)
    # nanoGPT's estimate: the mean over eval_iters batches of the batch mean; windows as train picks them
    # at iteration 0: numpy's generator seeded with (seed, split=1 for val, process 0, iteration 0, k).
    means = []
    for k in range(iters):
        ix = np.random.default_rng([seed, 1, 0, 0, k]).integers(0, len(val) - N_POS, size=B)
        total, count = torch_nll(model, [val[i:i + N_POS + 1] for i in ix])
        means.append(total / count)
    assert (r.tokens, r.batches) == (iters * B * N_POS, iters)
    np.testing.assert_allclose(r.loss, np.mean(means), rtol=1e-5)

    # `train` with eval_only (nanoGPT's eval configs) reports the same val loss.
    train(TrainConfig(init_from=str(folder), dataset="toks", data_dir=str(data_dir), out_dir=str(tmp_path),
                      eval_only=True, eval_iters=iters, batch_size=B, block_size=64, seed=seed, dtype="float32"),
          log=quiet)
    [metrics] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(metrics["val_loss"], r.loss, rtol=1e-6)


def test_checkpoint_on_its_dataset_and_on_a_text_file(char_run, input_text, tmp_path):
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


# ----------------------------------------------------------------------------------------------------- convert


def test_convert_hf_to_checkpoint_then_sample_eval_and_resume(hf_small, token_data, tmp_path, monkeypatch, capsys):
    model, folder = hf_small
    data_dir, _ = token_data
    out = tmp_path / "conv"
    code, stdout, err = in_process_cli(monkeypatch, capsys, "convert", f"--init_from={folder}", f"--out_dir={out}")
    assert code == 0, err
    assert "wrote" in stdout and "vocab_size=512" in stdout

    config, params, record = load_run(str(out))
    assert record.meta is None and record.iter_num == 0
    ref_config, ref_params = from_pretrained(folder)
    assert config == ref_config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref_params)
    idx = np.random.default_rng(1).integers(0, VOCAB, (2, N_POS))
    with torch.no_grad():
        expected = model(torch.from_numpy(idx)).logits.numpy()
    got = np.asarray(make_model(config).apply({"params": params}, jnp.asarray(idx))[0])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    # sample: no vocabulary in the record -> GPT-2 BPE text in and out (ids below 512 are BPE tokens)
    code, stdout, err = in_process_cli(monkeypatch, capsys, "sample", f"--out_dir={out}", "--start=Hello",
                                       "--num_samples=2", "--max_new_tokens=8")
    assert code == 0, err
    samples = stdout.split("\n---------------\n")
    assert len(samples) == 3 and all(s.startswith("Hello") for s in samples[:2])

    # the converted checkpoint evaluates like the folder it came from
    args = dict(dataset="toks", data_dir=str(data_dir), eval_iters=0, batch_size=4, dtype="float32")
    assert run(EvalConfig(out_dir=str(out), **args), progress=False).loss == pytest.approx(
        run(EvalConfig(init_from=str(folder), **args), progress=False).loss, rel=1e-6)

    # and finetunes with init_from=resume, from iteration 0
    train(TrainConfig(init_from="resume", out_dir=str(out), dataset="toks", data_dir=str(data_dir), batch_size=4,
                      gradient_accumulation_steps=1, eval_iters=1, eval_interval=2, max_iters=2, dtype="float32"),
          log=quiet)
    assert load_run(str(out))[2].iter_num == 2

    # converting into a folder that holds checkpoints is refused
    with pytest.raises(CheckpointError, match="already holds a run's checkpoints"):
        import_hf(str(folder), str(out))


def test_convert_checkpoint_to_hf(char_run, tmp_path, monkeypatch, capsys):
    out, _ = char_run
    config, params, record = load_run(str(out))
    assert not config.bias  # exported with zero biases: HF GPT-2 always has them
    hf_dir = tmp_path / "hf"
    code, stdout, err = in_process_cli(monkeypatch, capsys, "convert", f"--out_dir={out}", f"--hf_dir={hf_dir}")
    assert code == 0, err
    assert "iteration 10" in stdout

    hf, info = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    idx = np.random.default_rng(2).integers(0, 65, (2, 32))
    with torch.no_grad():
        got = hf.eval()(torch.from_numpy(idx)).logits.numpy()
    expected = np.asarray(make_model(config).apply({"params": params}, jnp.asarray(idx))[0])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    # the character vocabulary travels as meta.json: sampling the folder speaks characters
    assert json.loads((hf_dir / "meta.json").read_text()) == record.meta
    code, stdout, err = in_process_cli(monkeypatch, capsys, "sample", f"--init_from={hf_dir}", "--start=ROMEO:",
                                       "--num_samples=1", "--max_new_tokens=10")
    assert code == 0, err
    sample = stdout.split("\n---------------\n")[0]
    assert sample.startswith("ROMEO:") and len(sample) == 16 and set(sample) <= set(record.meta["itos"])


# ---------------------------------------------------------------------------------------------------- finetune


def test_finetune_from_hf_folder_crops_block_size_and_sets_dropout(bpe_data, tmp_path, monkeypatch, capsys):
    """nanoGPT's finetune_shakespeare recipe in miniature: GPT-2 BPE Shakespeare, a tiny full-vocab GPT-2."""
    data_dir, _ = bpe_data
    folder = tmp_path / "hf_bpe"
    hf_model(vocab=GPT2_VOCAB, n_embd=32, n_head=2).save_pretrained(folder)
    out = tmp_path / "ft"
    result = train(TrainConfig(init_from=str(folder), dataset="shakespeare", data_dir=str(data_dir),
                               out_dir=str(out), block_size=32, dropout=0.1, batch_size=8,
                               gradient_accumulation_steps=1, eval_iters=4, eval_interval=20, max_iters=40,
                               learning_rate=3e-3, decay_lr=False, always_save_checkpoint=False, dtype="float32"),
                   log=quiet)
    config, _, record = load_run(str(out))
    assert (config.block_size, config.dropout, config.vocab_size, config.n_embd) == (32, 0.1, GPT2_VOCAB, 32)
    assert record.meta is None and record.train["init_from"] == str(folder)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert val[-1] < val[0] - 1.0 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, (val, losses)
    assert result["iter_num"] == 40

    # GPT-2 BPE text in and out: eval of a text file, then sample
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 5
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    r = run(EvalConfig(out_dir=str(out), input=str(tmp_path / "t.txt"), eval_iters=0, batch_size=2,
                       dtype="float32"), progress=False)
    assert r.tokens == len(gpt2_encoding().encode(text)) - 1 and r.loss < val[0]
    code, stdout, err = in_process_cli(monkeypatch, capsys, "sample", f"--out_dir={out}", "--start=ROMEO:",
                                       "--num_samples=1", "--max_new_tokens=5", "--seed=3")
    assert code == 0 and stdout.startswith("ROMEO:"), err


# ----------------------------------------------------------------------------------------------- CLI and errors


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
    (["convert"], ["--hf_dir"]),
    (["convert", "--init_from=HF", "--hf_dir=x"], ["--hf_dir", "--out_dir"]),
    (["convert", "--init_from=gpt5"], ["'gpt5'", "gpt2-xl"]),
    (["convert", "--out_dir=never_trained", "--hf_dir=x"], ["never_trained"]),
])
def test_errors_are_one_line(args, fragments, hf_small, char_data, tmp_path, monkeypatch, capsys):
    _, folder = hf_small
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BIG" / "big").mkdir(parents=True)
    np.array([1, 2, 600, 3] * 100, np.uint16).tofile(tmp_path / "BIG" / "big" / "val.bin")
    args = [a.replace("HF", str(folder)).replace("CHAR", str(char_data[0])) for a in args]
    code, out, err = in_process_cli(monkeypatch, capsys, *args)
    assert code == 2 and out == "", (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_configs_parse_as_nanogpt_writes_them():
    from conftest import REPO

    for size, loss in [("gpt2", "3.12"), ("gpt2_medium", "2.84"), ("gpt2_large", "2.67"), ("gpt2_xl", "2.54")]:
        path = str(REPO / "configs" / f"eval_{size}.py")
        assert loss in open(path).read()
        for cls in (EvalConfig, TrainConfig):  # nanogpt-jax eval CONFIG.py and nanogpt-jax train CONFIG.py
            cfg = parse(cls, [path])
            assert (cfg.batch_size, cfg.eval_iters, cfg.eval_only, cfg.init_from, cfg.dataset) == (
                8, 500, True, size.replace("_", "-"), "openwebtext")
    cfg = parse(TrainConfig, [str(REPO / "configs" / "finetune_shakespeare.py")])
    assert (cfg.out_dir, cfg.eval_interval, cfg.eval_iters, cfg.dataset, cfg.init_from, cfg.always_save_checkpoint,
            cfg.batch_size, cfg.gradient_accumulation_steps, cfg.max_iters, cfg.learning_rate, cfg.decay_lr) == (
        "out-shakespeare", 5, 40, "shakespeare", "gpt2-xl", False, 1, 32, 20, 3e-5, False)
    assert issubclass(ConvertError, UserError) and issubclass(ConfigError, UserError)


def test_finetune_refuses_a_longer_block_size_and_a_smaller_vocabulary(hf_small, bpe_data, tmp_path):
    data_dir, _ = bpe_data
    _, folder = hf_small  # VOCAB = 512 ids: GPT-2 BPE Shakespeare holds ids up to 50256
    cfg = TrainConfig(init_from=str(folder), dataset="shakespeare", data_dir=str(data_dir),
                      out_dir=str(tmp_path / "ft"), block_size=N_POS + 1, dtype="float32")
    with pytest.raises(ConfigError, match=f"has only {N_POS} positions; it can be cropped, not grown"):
        train(cfg, log=quiet)
    with pytest.raises(DataError, match=f"and the model has {VOCAB} ids"):
        train(dataclasses.replace(cfg, block_size=N_POS), log=quiet)
