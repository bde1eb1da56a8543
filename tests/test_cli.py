"""The `nanogpt-jax` command as a user runs it: subprocesses of `python -m nanogpt_jax.cli` in a scratch folder.
Bad input must end with a non-zero exit and exactly one `error: ...` line on stderr, no traceback."""

import json
import os
import subprocess
import sys

import pytest

SEP = "---------------"
TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=5",
        "--learning_rate=1e-3", "--warmup_iters=2", "--lr_decay_iters=20", "--min_lr=1e-4"]


def cli(*args, cwd, timeout=300, **env_vars):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
    return subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(proc, *fragments):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, input_txt):
    """A scratch folder where `prepare` and a 20-iteration `train` have run (out_dir `out`)."""
    cwd = tmp_path_factory.mktemp("cli")
    prep = cli("prepare", "shakespeare_char", f"--input={input_txt}", cwd=cwd)
    train = cli("train", *TINY, "--max_iters=20", "--eval_interval=10", "--out_dir=out", "--compile=False",
                "--device=cpu", cwd=cwd)
    return cwd, prep, train


def test_prepare_prints_counts(workdir):
    cwd, prep, _ = workdir
    assert prep.returncode == 0, prep.stderr
    # nanoGPT's data/shakespeare_char/prepare.py: vocab 65, 1,003,854 train and 111,540 val tokens
    assert "vocab size 65" in prep.stdout
    assert "train 1,003,854 tokens" in prep.stdout and "val 111,540 tokens" in prep.stdout
    assert os.path.getsize(cwd / "data" / "shakespeare_char" / "train.bin") == 2 * 1_003_854


def test_train_then_sample(workdir):
    cwd, _, train = workdir
    assert train.returncode == 0, train.stderr
    out = train.stdout
    notes = train.stderr  # nanoGPT's flags with no meaning here: a note each, on stderr
    assert "--compile has no effect" in notes and "--device has no effect" in notes
    # nanoGPT's count: wte 65*32 + one bias-free block 12*32^2 + 2*32 + ln_f 32 = 14,464 -> "0.01M"
    assert "number of parameters: 0.01M" in out
    assert "step 0:" in out and "step 20:" in out and "iter 15:" in out
    assert (cwd / "out" / "metrics.jsonl").is_file() and (cwd / "out" / "checkpoints" / "latest").is_dir()

    (cwd / "prompt.txt").write_text("ROMEO:", encoding="utf-8")
    proc = cli("sample", "--out_dir=out", "--num_samples=2", "--max_new_tokens=20", "--start=FILE:prompt.txt",
               cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(SEP) == 2
    samples = proc.stdout.split("\n" + SEP + "\n")
    assert samples[2] == ""
    itos = json.loads((cwd / "data" / "shakespeare_char" / "meta.json").read_text(encoding="utf-8"))["itos"]
    for s in samples[:2]:
        assert s.startswith("ROMEO:")
        assert len(s) == len("ROMEO:") + 20  # characters: one token each
        assert set(s) <= set(itos)


def test_unknown_option(tmp_path):
    proc = cli("train", "--learnin_rate=1e-3", cwd=tmp_path)
    assert_one_error_line(proc, "--learnin_rate", "did you mean --learning_rate")


def test_bad_option_value(tmp_path):
    proc = cli("train", "--max_iters='abc'", cwd=tmp_path)
    assert_one_error_line(proc, "--max_iters", "expected int")


def test_train_without_prepared_data_says_run_prepare(tmp_path):
    proc = cli("train", *TINY, "--data_dir=nowhere", "--max_iters=2", cwd=tmp_path)
    assert_one_error_line(proc, "nanogpt-jax prepare shakespeare_char")


def test_sample_from_missing_out_dir(tmp_path):
    proc = cli("sample", "--out_dir=not_trained", cwd=tmp_path)
    assert_one_error_line(proc, "not_trained")
    assert not (tmp_path / "not_trained").exists()


def test_prepare_unknown_dataset(tmp_path):
    proc = cli("prepare", "openwebtext", cwd=tmp_path)
    assert_one_error_line(proc, "openwebtext", "shakespeare_char")
    proc = cli("prepare", "shakespeare_char", "--input=missing.txt", cwd=tmp_path)
    assert_one_error_line(proc, "missing.txt")


def test_sample_start_file_missing(workdir):
    cwd, _, train = workdir
    assert train.returncode == 0, train.stderr
    proc = cli("sample", "--out_dir=out", "--start=FILE:missing.txt", "--max_new_tokens=2", cwd=cwd)
    assert_one_error_line(proc, "missing.txt")


def test_usage(tmp_path):
    proc = cli(cwd=tmp_path)
    assert proc.returncode != 0 and "usage: nanogpt-jax" in proc.stderr
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "usage: nanogpt-jax" in proc.stderr


def test_two_devices_train_like_one(workdir):
    """The command splits each batch over one host device per core; the losses equal a one-device run."""
    cwd = workdir[0]
    runs = {}
    for n in (1, 2):
        proc = cli("train", *TINY, "--max_iters=10", "--eval_interval=10", "--log_interval=1",
                   f"--num_devices={n}", f"--out_dir=dev{n}", cwd=cwd,
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")  # two devices whatever the cores
        assert proc.returncode == 0, proc.stderr
        assert f"devices: {n} x cpu" in proc.stdout
        lines = [json.loads(line) for line in (cwd / f"dev{n}" / "metrics.jsonl").read_text().splitlines()]
        runs[n] = [r["loss"] for r in lines if "loss" in r] + [r["val_loss"] for r in lines if "val_loss" in r]
    assert len(runs[1]) == 12
    # same batches, same init: only the order of the gradient all-reduce's float additions differs
    assert runs[2] == pytest.approx(runs[1], rel=1e-5)
